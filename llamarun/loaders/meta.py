"""Official Meta folders: params.json + consolidated.NN.pth model-parallel shards."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from llamarun.config import ModelArgs, read_json
from llamarun.errors import CheckpointError, ConfigError
from llamarun.loaders.fuse import RawCheckpoint, expected_shapes, type_name
from llamarun.loaders.torch_file import load_state_dict_file
from llamarun.preflight import check_plausible

log = logging.getLogger(__name__)

_SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
# Buffers that Meta's checkpoints carry but that are not weights.
_IGNORED = {"rope.freqs"}


def is_meta_folder(path: Path) -> bool:
    """True when `path` holds params.json and at least one consolidated.NN.pth."""
    return (path / "params.json").is_file() and any(path.glob("consolidated.*.pth"))


def shard_files(folder: Path) -> list[Path]:
    """consolidated.00.pth ... in order; a gap in the numbering is an error."""
    found = sorted((int(m.group(1)), p) for p in folder.glob("consolidated.*.pth")
                   if (m := _SHARD.search(p.name)))
    if not found:
        raise CheckpointError(f"{folder}: no consolidated.NN.pth shard found")
    for expected, (index, path) in enumerate(found):
        if index != expected:
            raise CheckpointError(f"{folder}: shard consolidated.{expected:02d}.pth is missing "
                                  f"(found {path.name})")
    return [p for _, p in found]


def merge_shards(name: str, parts: list[torch.Tensor], expected: tuple[int, ...],
                 where: str) -> torch.Tensor:
    """Join one tensor's model-parallel pieces, choosing the split from their shapes.

    A piece the size of the whole tensor is replicated (norms); otherwise the one dimension
    in which the pieces are smaller is the split one: dim 0 for column-parallel weights
    (wq, wk, wv, w1, w3, output, Llama 3's vocab-parallel embedding), dim 1 for row-parallel
    ones (wo, w2, Llama 2's embedding). When there are more shards than KV heads, wk/wv pieces
    repeat and each distinct piece is kept once.
    """
    first = tuple(parts[0].shape)
    if any(tuple(p.shape) != first for p in parts):
        raise CheckpointError(f"{where}: tensor {name} has different shapes across shards")
    if first == expected or len(parts) == 1:
        return parts[0]
    if len(first) != len(expected):
        raise CheckpointError(f"{where}: tensor {name} has shape {first}, expected {expected}")
    split = [d for d in range(len(first)) if first[d] != expected[d]]
    if len(split) != 1:
        raise CheckpointError(f"{where}: tensor {name} shard shape {first} does not divide "
                              f"the expected shape {expected}")
    dim = split[0]
    total = first[dim] * len(parts)
    if total != expected[dim]:
        if total % expected[dim] or expected[dim] % first[dim]:
            raise CheckpointError(f"{where}: tensor {name}: {len(parts)} shards of {first} do not "
                                  f"make {expected}")
        parts = parts[:: total // expected[dim]]  # replicated KV heads
    return torch.cat(parts, dim=dim)


def _infer_vocab(emb: torch.Tensor | None, n_shards: int, dim: int, folder: Path) -> int:
    """The vocabulary size from one shard's embedding (split by vocabulary rows, as Llama 3, or
    by embedding columns, as Llama 2)."""
    if emb is None or emb.dim() != 2:
        raise CheckpointError(f"{folder}: tensor tok_embeddings.weight is missing")
    rows, cols = emb.shape
    return rows if cols * n_shards == dim and cols != dim else rows * n_shards


def _scaling_from_hf_sibling(folder: Path, args: ModelArgs) -> ModelArgs:
    """Take the RoPE scaling from the HF config.json beside an `original/` Meta folder.

    Meta's params.json says only `use_scaled_rope`; its reference code then assumes factor 8,
    which is right for 3.1 but not for 3.2 (32). HF repositories ship the Meta files in
    `original/` next to a config.json that records the real factor.
    """
    cfg_path = folder.parent / "config.json"
    if cfg_path.is_file():
        try:
            hf = ModelArgs.from_hf_config(read_json(cfg_path), source=str(cfg_path))
        except ConfigError:
            hf = None
        if hf is not None and hf.rope_scaling is not None and hf.dim == args.dim:
            return args.replace(rope_scaling=hf.rope_scaling)
    log.warning("%s: use_scaled_rope without rope_scaling_factor; assuming Meta's factor %g "
                "(Llama 3.1). A Llama 3.2 folder needs \"rope_scaling_factor\": 32 in params.json",
                folder / "params.json", args.rope_scaling.factor)
    return args


def _int_or(params: dict[str, object], key: str, default: int) -> int:
    """params[key] when it is an integer, else `default` (from_params reports a bad value)."""
    value = params.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def read_meta(folder: Path, *, prefer: int = 0) -> RawCheckpoint:
    """Open a Meta folder lazily (mmap) and describe it as a RawCheckpoint.

    Shards are opened when a tensor needs them, shard `prefer` first: a tensor-parallel rank of
    a job with as many ranks as shards reads only its own shard (`read_slice`).
    """
    params = read_json(folder / "params.json")
    files = shard_files(folder)
    n = len(files)
    prefer = prefer if 0 <= prefer < n else 0
    shards: dict[int, dict[str, torch.Tensor]] = {}
    names: set[str] = set()

    def shard(i: int) -> dict[str, torch.Tensor]:
        nonlocal names
        if i not in shards:
            sd = load_state_dict_file(files[i])
            keys = set(sd) - _IGNORED
            if names and keys != names:
                odd = sorted(keys ^ names)[0]
                raise CheckpointError(f"{files[i]}: tensor {odd} is not in every shard")
            names = keys
            shards[i] = sd
        return shards[i]

    own = shard(prefer)
    vocab = None
    if _int_or(params, "vocab_size", -1) <= 0:
        vocab = _infer_vocab(own.get("tok_embeddings.weight"), n, _int_or(params, "dim", 0), folder)
    args = ModelArgs.from_params(params, source=str(folder / "params.json"), vocab_size=vocab)
    check_plausible(args, n_tensors=len(names), source=str(folder / "params.json"))
    if args.rope_scaling is not None and "rope_scaling_factor" not in params:
        args = _scaling_from_hf_sibling(folder, args)
    shapes = expected_shapes(args)
    label = str(files[0]) if n == 1 else f"{folder}/consolidated.*.pth"

    def get(name: str) -> torch.Tensor:
        piece = own[name]
        if tuple(piece.shape) == shapes.get(name):  # replicated in every shard (norms)
            return piece
        parts = [shard(i)[name] for i in range(n)]
        return merge_shards(name, parts, shapes[name], label)

    def stored(name: str) -> str:  # from this rank's own shard, without opening the others
        return type_name(own[name].dtype)

    def get_slice(name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        piece = own[name]
        full = shapes.get(name)
        if full is None or tuple(piece.shape) == full or piece.dim() != len(full):
            return get(name).narrow(dim, start, stop - start)
        split = [d for d in range(len(full)) if piece.shape[d] != full[d]]
        size = piece.shape[split[0]]
        if split != [dim] or start // size != (stop - 1) // size or (size * n) % full[dim]:
            return get(name).narrow(dim, start, stop - start)  # split otherwise: merge
        index = start // size  # which distinct piece holds the slice
        repeat = size * n // full[dim]  # shards holding each piece (replicated KV heads)
        holders = [index * repeat + j for j in range(repeat)]
        i = prefer if prefer in holders else holders[0]
        return shard(i)[name].narrow(dim, start - index * size, stop - start)

    return RawCheckpoint(args=args, layout="meta", path=folder, names=names, get=get,
                         where=lambda name: label, get_slice=get_slice, types=stored,
                         extra={"n_shards": n, "opened": shards})
