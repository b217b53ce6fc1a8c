"""Hugging Face folders: config.json + safetensors (or pytorch_model*.bin), sharded or not."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from llamarun.config import ModelArgs, read_json
from llamarun.errors import CheckpointError
from llamarun.loaders.files import check_regular, index_entry
from llamarun.loaders.fuse import RawCheckpoint, expected_shapes
from llamarun.loaders.torch_file import first_line, load_state_dict_file
from llamarun.preflight import check_plausible

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def meta_name(hf_name: str) -> str | None:
    """The Meta name for an HF tensor name; None for buffers that are not weights."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if hf_name in _TOP_MAP:
        return _TOP_MAP[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return hf_name  # reported as unexpected by the checks


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation (rotate-half layout -> Meta's interleaved pairs)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def is_hf_folder(path: Path) -> bool:
    """True when `path` has config.json and safetensors or pytorch_model*.bin weights."""
    return (path / "config.json").is_file() and bool(weight_files(path))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder, from its index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            files = {index_entry(folder, index, k, v) for k, v in weight_map.items()}
            for path in files:
                check_regular(path, listed_in=index)
            return sorted(files)
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    for path in found:  # no index: a folder, FIFO or dangling link named like weights
        check_regular(path)
    return found


class _Files:
    """Tensor name -> reader over every weight file, opened lazily (safe_open / mmap)."""

    def __init__(self, files: list[Path]) -> None:
        self.location: dict[str, Path] = {}
        self.bytes_read = 0  # tensor bytes handed out (what a tensor-parallel rank reads)
        self._st: dict[Path, object] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        for path in files:
            check_regular(path)
            try:
                if path.suffix == ".safetensors":
                    handle = safe_open(str(path), framework="pt")
                    self._st[path] = handle
                    keys = list(handle.keys())
                else:
                    self._bin[path] = load_state_dict_file(path)
                    keys = list(self._bin[path])
            except CheckpointError:
                raise
            except Exception as e:  # corrupt safetensors headers raise library-specific types
                raise CheckpointError(f"{path}: cannot read weights ({first_line(e)})") from None
            for key in keys:
                self.location[key] = path

    def get(self, name: str) -> torch.Tensor:
        path = self.location[name]
        try:
            if path in self._st:
                t = self._st[path].get_tensor(name)  # type: ignore[attr-defined]
            else:
                t = self._bin[path][name]
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None
        self.bytes_read += t.nbytes
        return t

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """start:stop along `dim` of a tensor, reading only those bytes from a safetensors file."""
        path = self.location[name]
        if path not in self._st:
            return self._bin[path][name].narrow(dim, start, stop - start)
        try:
            view = self._st[path].get_slice(name)  # type: ignore[attr-defined]
            shape = view.get_shape()
            if dim >= len(shape) or not 0 <= start <= stop <= shape[dim]:
                raise ValueError(f"slice {start}:{stop} of dim {dim} outside shape {shape}")
            t = view[start:stop] if dim == 0 else view[:, start:stop]
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None
        self.bytes_read += t.nbytes
        return t


def read_hf(folder: Path) -> RawCheckpoint:
    """Open an HF folder lazily and describe it as a RawCheckpoint in Meta's layout."""
    cfg_path = folder / "config.json"
    args = ModelArgs.from_hf_config(read_json(cfg_path), source=str(cfg_path))
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    reader = _Files(files)
    check_plausible(args, n_tensors=len(reader.location), source=str(cfg_path))
    to_hf: dict[str, str] = {}
    for hf_name in reader.location:
        name = meta_name(hf_name)
        if name is not None:
            to_hf[name] = hf_name

    shapes = expected_shapes(args)

    def get(name: str) -> torch.Tensor:
        t = reader.get(to_hf[name])
        if tuple(t.shape) != shapes.get(name):
            return t  # reported with file and tensor name by the checks
        if name.endswith("attention.wq.weight"):
            return unpermute(t, args.n_heads)
        if name.endswith("attention.wk.weight"):
            return unpermute(t, args.n_kv_heads)
        return t

    def get_slice(name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        t = reader.get_slice(to_hf[name], dim, start, stop)
        # HF permutes each head's rows of q and k: a slice of whole heads undoes it locally.
        heads = (stop - start) // args.head_dim
        if dim == 0 and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            return unpermute(t, heads)
        return t

    def where(name: str) -> str:
        return str(reader.location[to_hf[name]]) if name in to_hf else str(folder)

    return RawCheckpoint(args=args, layout="hf", path=folder, names=set(to_hf), get=get,
                         where=where, get_slice=get_slice,
                         extra={"files": [str(f) for f in files], "reader": reader})


