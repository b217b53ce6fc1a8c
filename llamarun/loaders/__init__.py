"""Load a checkpoint (Meta folder, HF folder or GGUF file) into a ready Transformer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from llamarun.config import ModelArgs
from llamarun.device import resolve_device, resolve_dtype
from llamarun.errors import CheckpointError, InvalidArgumentError
from llamarun.loaders.fuse import (
    FLOAT_TYPES, QUANTIZE_MODES, Progress, RawCheckpoint, build_state_dict, check_names, plan_formats,
    resolve_tied,
)
from llamarun.loaders.files import check_regular, check_side_files
from llamarun.loaders.hf import is_hf_folder, read_hf
from llamarun.loaders.meta import is_meta_folder, read_meta
from llamarun.model import Transformer
from llamarun.preflight import check_memory, warn_long_context
from llamarun.quant import INT4_GROUP_SIZES, WeightFormat, swap_modules

log = logging.getLogger(__name__)


class TensorParallel(Protocol):
    """A rank's place in a tensor-parallel job (llamarun.parallel.Collectives)."""

    rank: int
    world: int

    def bind(self, plan: Any) -> None: ...

DEFAULT_MAX_SEQ_LEN = 4096  # cache length when the caller gives none (models allow up to 128K)


@dataclass
class Checkpoint:
    """A loaded model with what was learned while loading it."""

    model: Transformer
    args: ModelArgs
    layout: str  # "meta" | "hf" | "gguf"
    path: Path
    device: torch.device
    dtype: torch.dtype
    raw: RawCheckpoint
    formats: dict[str, WeightFormat]  # how each matrix is stored (dense, int8, int4)

    def storage(self, name: str) -> str:
        """How matrix `name` is held: its dtype when dense, else "int8" / "int4 (group 32)"."""
        fmt = self.formats[name]
        return str(self.dtype).removeprefix("torch.") if fmt.kind == "dense" else str(fmt)

    def format_counts(self) -> dict[str, int]:
        """How many matrices are stored in each format ("bfloat16", "int8", "int4 (group 32)")."""
        counts: dict[str, int] = {}
        for name in self.formats:
            if name == "output.weight" and self.args.tie_embeddings:
                continue
            label = self.storage(name)
            counts[label] = counts.get(label, 0) + 1
        return counts


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def detect_layout(path: Path) -> tuple[str, Path]:
    """('meta' | 'hf' | 'gguf', the path to read) from the contents of `path`."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        check_regular(path, what="checkpoint file")  # a FIFO or /dev/zero is not read
    else:
        check_side_files(path)
    if path.is_file():
        if _is_gguf_file(path):
            return "gguf", path
        raise CheckpointError(f"{path}: not a GGUF file; give a folder for Meta or HF checkpoints")
    if is_hf_folder(path):
        return "hf", path
    if is_meta_folder(path):
        return "meta", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several .gguf files; name one of them")
    raise CheckpointError(f"{path}: no checkpoint found (looked for params.json + consolidated.*.pth, "
                          "config.json + *.safetensors / pytorch_model*.bin, or a .gguf file)")


def read_checkpoint(path: str | Path, *, prefer_shard: int = 0) -> RawCheckpoint:
    """Open a checkpoint lazily, whatever its layout (a Meta folder's shard `prefer_shard`
    first)."""
    layout, target = detect_layout(Path(path))
    if layout == "meta":
        raw = read_meta(target, prefer=prefer_shard)
    elif layout == "hf":
        raw = read_hf(target)
    else:
        from llamarun.loaders.gguf import read_gguf

        raw = read_gguf(target)
    return resolve_tied(raw)


def check_quantize(quantize: str, group_size: int) -> None:
    """Raise InvalidArgumentError for an unknown quantize mode or int4 group size."""
    if quantize not in QUANTIZE_MODES:
        raise InvalidArgumentError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, "
                                   f"got {quantize!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidArgumentError(f"--group-size must be one of "
                                   f"{', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")


def load_checkpoint(path: str | Path, *, device: str | torch.device = "auto",
                    dtype: str | torch.dtype = "auto", max_seq_len: int | None = None,
                    max_batch_size: int = 1, quantize: str = "auto", group_size: int = 32,
                    progress: Progress | None = None,
                    tp: TensorParallel | None = None) -> Checkpoint:
    """Load a checkpoint into a Transformer on `device` in `dtype`, with its KV cache set up.

    dtype "auto" picks what the device runs well without inflating the checkpoint (see
    device.default_dtype). quantize: "auto" keeps a GGUF's quantized tensors quantized, "none"
    dequantizes everything into dtype, "int8"/"int4" quantize every projection at load (int4 in
    groups of group_size). max_seq_len is the KV cache length: by default the model's context,
    capped at 4096. progress(done, total) is called as layers are converted (for a progress bar).
    With `tp` (tensor parallelism), the model is this rank's part, and only its slices are read.
    """
    check_quantize(quantize, group_size)
    dev = resolve_device(device)
    raw = read_checkpoint(path, prefer_shard=tp.rank if tp is not None else 0)
    check_names(raw)
    plan = None
    if tp is not None:
        from llamarun.parallel import TPPlan

        plan = TPPlan.make(raw.args, tp.rank, tp.world)
        tp.bind(plan)
    formats = plan_formats(raw, quantize, group_size, shard=plan)
    dt = resolve_dtype(dtype, dev, stored=_stored_dtype(raw, formats))
    seq = max_seq_len or min(raw.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    # Before any weight is read or any module built: refuse what will not fit, saying what would.
    check_memory(raw.args, device=dev, dtype=dt, max_seq_len=seq, slots=max_batch_size,
                 formats=formats, world=tp.world if tp is not None else 1, source=str(raw.path))
    if max_seq_len is not None:
        warn_long_context(raw.args, max_seq_len, str(raw.path))
    sd = build_state_dict(raw, dtype=dt, device=dev, formats=formats, progress=progress,
                          shard=plan)
    with torch.device("meta"):
        model = Transformer(raw.args)
        if tp is not None:
            from llamarun.parallel import shard_model

            shard_model(model, plan, tp)
        swap_modules(model, formats, device=dev, dtype=dt)
    model.load_state_dict(sd, strict=True, assign=True)
    if raw.args.tie_embeddings and formats["output.weight"].kind == "dense":
        model.output.weight = model.tok_embeddings.weight
    model.eval().requires_grad_(False)
    model.setup_caches(max_batch_size, seq)
    log.debug("loaded %s checkpoint %s (%s, %s)", raw.layout, raw.path, dev, dt)
    return Checkpoint(model=model, args=raw.args, layout=raw.layout, path=raw.path, device=dev,
                      dtype=dt, raw=raw, formats=formats)


def _stored_dtype(raw: RawCheckpoint, formats: dict[str, WeightFormat]) -> torch.dtype | None:
    """The float dtype the checkpoint's dense projections are stored in (None if quantized)."""
    name = "layers.0.attention.wqkv.weight"
    if raw.args.n_layers == 0 or formats[name].kind != "dense":
        return None
    return FLOAT_TYPES.get(raw.stored_type("layers.0.attention.wq.weight"))
