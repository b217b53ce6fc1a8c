"""From a layout-neutral RawCheckpoint to the fused state dict the model knows.

Every loader (Meta, HF, GGUF) produces Meta-named, unfused tensors in Meta's RoPE layout; the
checks, the dtype/device conversion and the Q/K/V and gate/up fusion happen here, tensor by
tensor, so that peak memory stays near one copy of the model in the target dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from llamarun import hugepages
from llamarun.config import ModelArgs
from llamarun.errors import CheckpointError
from llamarun.quant import (
    DENSE, INT8, Int4Parts, Int8Embedding, Int8Parts, WeightFormat, cat_int4, module_state,
    quantize_int4, quantize_int8,
)


@dataclass
class RawCheckpoint:
    """A checkpoint opened lazily: its config and a getter for each Meta-named tensor."""

    args: ModelArgs
    layout: str  # "meta" | "hf" | "gguf"
    path: Path
    names: set[str]  # Meta names present, unfused (e.g. layers.0.attention.wq.weight)
    get: Callable[[str], torch.Tensor]  # name -> tensor on CPU, any float dtype, Meta layout
    where: Callable[[str], str]  # name -> the file that holds it, for error messages
    extra: dict[str, object] = field(default_factory=dict)  # layout-specific metadata
    # name -> how the file stores it ("F32", "BF16", "Q4_K", ...); None: read from the tensor
    types: Callable[[str], str] | None = None
    # name -> the tensor's exact int4 (group 32) form, or None where it has none (GGUF Q4 types)
    int4: Callable[[str], Int4Parts | None] | None = None
    int4_types: frozenset[str] = frozenset()  # stored types that int4() converts exactly
    int4_symmetric_types: frozenset[str] = frozenset()  # those of them whose zeros are all 0
    # name -> drop the file pages behind a tensor that has been copied out (GGUF mmaps)
    release: Callable[[str], None] | None = None
    # (name, start, stop) -> rows start:stop of a tensor, read without the rest (GGUF)
    get_rows: Callable[[str, int, int], torch.Tensor] | None = None
    # (name, dim, start, stop) -> that slice of a tensor, read without the rest (safetensors,
    # a Meta shard that holds exactly it)
    get_slice: Callable[[str, int, int, int], torch.Tensor] | None = None

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Tensor `name` narrowed to start:stop along `dim`, reading as little as the format
        allows (mmapped files read only the pages of the slice)."""
        if self.get_slice is not None:
            return self.get_slice(name, dim, start, stop)
        if dim == 0 and self.get_rows is not None:
            return self.get_rows(name, start, stop)
        return self.get(name).narrow(dim, start, stop - start)

    def stored_type(self, name: str) -> str:
        """How the checkpoint stores tensor `name`: "F32", "F16", "BF16" or a GGUF type name."""
        if self.types is not None:
            return self.types(name)
        return type_name(self.get(name).dtype)


FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # stored types
_TYPE_NAMES = {dtype: name for name, dtype in FLOAT_TYPES.items()}


def type_name(dtype: torch.dtype) -> str:
    """The stored-type name of a float tensor's dtype ("F32", "BF16", ...)."""
    return _TYPE_NAMES.get(dtype, str(dtype))


_ALIGN = 64  # bytes


class Shard(Protocol):
    """The part of each tensor a tensor-parallel rank reads (llamarun.parallel.TPPlan)."""

    def slice_of(self, name: str) -> tuple[int, int, int] | None: ...

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]: ...


def expected_shapes(args: ModelArgs, shard: Shard | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every unfused Meta-named tensor for `args` (output.weight included); with a
    `shard`, of the slice it reads."""
    if shard is not None:
        return {n: shard.local_shape(n, s) for n, s in expected_shapes(args).items()}
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_layer = {
        "attention.wq.weight": (q, args.dim),
        "attention.wk.weight": (kv, args.dim),
        "attention.wv.weight": (kv, args.dim),
        "attention.wo.weight": (args.dim, q),
        "feed_forward.w1.weight": (args.hidden_dim, args.dim),
        "feed_forward.w2.weight": (args.dim, args.hidden_dim),
        "feed_forward.w3.weight": (args.hidden_dim, args.dim),
        "attention_norm.weight": (args.dim,),
        "ffn_norm.weight": (args.dim,),
    }
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (args.vocab_size, args.dim),
    }
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def resolve_tied(raw: RawCheckpoint) -> RawCheckpoint:
    """Mark the embeddings as tied when the checkpoint has no separate output.weight."""
    if "output.weight" not in raw.names and not raw.args.tie_embeddings:
        raw.args = raw.args.replace(tie_embeddings=True)
    return raw


def check_names(raw: RawCheckpoint) -> None:
    """Raise CheckpointError for a missing or unexpected tensor, naming file and tensor."""
    expected = expected_shapes(raw.args)
    if raw.args.tie_embeddings:
        expected.pop("output.weight")
    missing = sorted(set(expected) - raw.names, key=_natural)
    if missing:
        raise CheckpointError(f"{raw.path}: tensor {missing[0]} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(raw.names - set(expected) - {"output.weight"}, key=_natural)
    if unexpected:
        name = unexpected[0]
        raise CheckpointError(f"{raw.where(name)}: unexpected tensor {name} "
                              f"(not part of a Llama model with {raw.args.n_layers} layers)")


Progress = Callable[[int, int], None]  # (steps done, total steps)

QUANTIZE_MODES = ("auto", "none", "int8", "int4")

# Each weight of the model and the checkpoint tensors it is built from (rows stacked in order).
_LAYER_SOURCES = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "attention.wo.weight": ("attention.wo.weight",),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
    "feed_forward.w2.weight": ("feed_forward.w2.weight",),
}


def linear_sources(args: ModelArgs) -> dict[str, tuple[str, ...]]:
    """Model weight name -> checkpoint tensors, for every matrix (embedding and output included)."""
    out: dict[str, tuple[str, ...]] = {"tok_embeddings.weight": ("tok_embeddings.weight",)}
    out["output.weight"] = ("tok_embeddings.weight" if args.tie_embeddings else "output.weight",)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out.update({p + k: tuple(p + s for s in v) for k, v in _LAYER_SOURCES.items()})
    return out


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether an (out, in) matrix can be stored as int4: whole groups, rows in tiles of 16."""
    return in_features % group_size == 0 and out_features % 16 == 0


def plan_formats(raw: RawCheckpoint, quantize: str = "auto", group_size: int = 32, *,
                 shard: Shard | None = None) -> dict[str, WeightFormat]:
    """Decide how each matrix of the model is stored.

    "auto" keeps what the checkpoint has: dense tensors stay dense; GGUF Q4_0/Q4_1/Q4_K become
    int4 in groups of 32 (the same numbers), other quantized types per-row int8. "none" makes
    everything dense; "int8"/"int4" quantize every projection (int4 in groups of group_size, the
    output layer int8) and store the embedding as int8. A fused weight whose parts differ takes the
    wider format; a tied output shares the embedding's. A matrix int4 cannot hold (see
    int4_fits) becomes int8.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    shapes = expected_shapes(raw.args, shard)
    int4 = WeightFormat("int4", group_size)
    formats: dict[str, WeightFormat] = {}
    for name, sources in linear_sources(raw.args).items():
        out_features = sum(shapes[s][0] for s in sources)
        in_features = shapes[sources[0]][1]
        matrix = name not in ("tok_embeddings.weight", "output.weight")
        if quantize == "none" or (quantize == "auto" and raw.types is None):
            fmt = DENSE  # Meta and HF checkpoints are dense
        elif quantize in ("int8", "int4"):
            fits = matrix and int4_fits(out_features, in_features, group_size)
            fmt = int4 if quantize == "int4" and fits else INT8
        else:
            types = {raw.stored_type(s) for s in sources}
            if types <= FLOAT_TYPES.keys():
                fmt = DENSE
            elif (types <= raw.int4_types and name != "tok_embeddings.weight"
                  and int4_fits(out_features, in_features, 32)):
                fmt = WeightFormat("int4", 32, symmetric=types <= raw.int4_symmetric_types)
            else:
                fmt = INT8
        formats[name] = fmt
    if raw.args.tie_embeddings:
        formats["output.weight"] = formats["tok_embeddings.weight"]
    return formats


def build_state_dict(raw: RawCheckpoint, *, dtype: torch.dtype, device: torch.device,
                     formats: dict[str, WeightFormat] | None = None,
                     progress: Progress | None = None,
                     shard: Shard | None = None) -> dict[str, torch.Tensor]:
    """Read, check, convert and fuse every tensor into the model's state dict.

    `formats` (from plan_formats; all dense when None) says how each matrix is stored.
    progress, if given, is called after the embeddings and after each layer. With a `shard`
    (tensor parallelism), only this rank's slice of each tensor is read.
    """
    check_names(raw)
    full = expected_shapes(raw.args)
    shapes = expected_shapes(raw.args, shard)
    sources = linear_sources(raw.args)
    formats = formats or {}
    # on CPU, what every decode pass reads goes into huge pages, in the order it is loaded
    arena = hugepages.Arena() if device.type == "cpu" else None

    def get(name: str) -> torch.Tensor:
        cut = shard.slice_of(name) if shard is not None else None
        if cut is None or cut[1:] == (0, full[name][cut[0]]):
            return raw.get(name)
        return raw.read_slice(name, *cut)

    def read(name: str) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"{raw.where(name)}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"expected {shapes[name]} from the config")
        if not t.is_floating_point():
            raise CheckpointError(f"{raw.where(name)}: tensor {name} has dtype {t.dtype}, "
                                  "expected floating point")
        check_finite(t, name, raw.where(name))
        return t

    def copied(*names: str) -> None:
        """The tensors `names` are copied out: their file pages may go."""
        if raw.release is not None:
            for n in names:
                raw.release(n)

    def streamed(name: str) -> bool:
        """Whether every decode pass reads all of the model weight `name` (an embedding table
        is read a row a token, unless it is the output layer too)."""
        return name != "tok_embeddings.weight" or raw.args.tie_embeddings

    def dense(*names: str, hot: bool = False) -> torch.Tensor:
        """The dense tensor of `names` (fused along rows when several); hot: in huge pages on
        CPU (the arena's memory)."""
        into_arena = hot and arena is not None
        if len(names) == 1 and not into_arena:
            src = read(names[0])
            t = src.to(device=device, dtype=dtype)
            # A tensor still backed by the file (same dtype, mmapped) or by numpy sits wherever
            # its data happened to be; matmul kernels run measurably slower on weights that are
            # not 64-byte aligned, which a fresh allocation is.
            if not t.is_contiguous() or t.data_ptr() % _ALIGN:
                t = t.clone(memory_format=torch.contiguous_format)
            if t.data_ptr() != src.data_ptr():
                copied(names[0])
            return t
        # Copy each part straight into its rows of the result (fused, or in the arena): one
        # converting copy, no temporaries.
        rows = sum(shapes[n][0] for n in names)
        shape = (rows, *shapes[names[0]][1:])
        out = (arena.empty(shape, dtype) if into_arena
               else torch.empty(shape, dtype=dtype, device=device))
        start = 0
        for n in names:
            part = read(n)
            out[start:start + part.shape[0]].copy_(part)
            start += part.shape[0]
            del part
        copied(*names)
        return out

    def int4_parts(name: str, group_size: int) -> Int4Parts:
        exact = raw.int4(name) if group_size == 32 and raw.int4 is not None else None
        cut = shard.slice_of(name) if shard is not None else None
        if exact is not None and cut is not None:
            exact = _slice_int4(exact, *cut)
        if exact is not None:
            if tuple(exact.q.shape) != shapes[name]:
                read(name)  # raises the shape error
            check_finite(exact.scale, name, raw.where(name))
            check_finite(exact.zero, name, raw.where(name))
            return exact
        return quantize_int4(read(name), group_size)

    def add(name: str) -> None:
        """Put the model weight `name` (and its scales, when quantized) into sd."""
        parts = sources[name]
        fmt = formats.get(name, DENSE)
        prefix = name.removesuffix("weight")
        if fmt.kind == "dense":
            sd[name] = dense(*parts, hot=streamed(name))
            return
        if fmt.kind == "int8":
            cut = shard.slice_of(parts[0]) if shard is not None else None
            if cut is not None and cut[0] == 1:
                # A row-parallel slice keeps the scales of whole rows: the ranks' partial
                # products then add up to the unsplit model's exactly.
                whole = raw.get(parts[0])
                if tuple(whole.shape) != full[parts[0]]:
                    read(parts[0])  # raises the shape error
                check_finite(whole, parts[0], raw.where(parts[0]))
                rows = quantize_int8(whole)
                q = Int8Parts(rows.q[:, cut[1]:cut[2]].contiguous(), rows.scale)
                del whole, rows
            elif len(parts) == 1 and raw.get_rows is not None:
                first = cut[1] if cut is not None else 0
                q = _int8_by_rows(raw, parts[0], shapes[parts[0]], first)
            else:
                whole = read(parts[0]) if len(parts) == 1 else torch.cat([read(n) for n in parts])
                q = quantize_int8(whole)  # row by row in float32
                del whole
        else:
            q = cat_int4([int4_parts(n, fmt.group_size) for n in parts])
        copied(*parts)
        if name == "tok_embeddings.weight":
            state = Int8Embedding.state(q, device=device)
        else:
            state = module_state(fmt, q, device=device, dtype=dtype)
        del q
        if streamed(name) and arena is not None:
            state = {k: arena.placed(v) for k, v in state.items()}
        sd.update({prefix + k: v for k, v in state.items()})

    sd: dict[str, torch.Tensor] = {}
    add("tok_embeddings.weight")
    sd["norm.weight"] = dense("norm.weight", hot=True)
    tied_fmt = formats.get("tok_embeddings.weight", DENSE)
    if raw.args.tie_embeddings and tied_fmt.kind == "dense":
        sd["output.weight"] = sd["tok_embeddings.weight"]
    elif raw.args.tie_embeddings:  # the same int8 rows; the scales in the product's dtype
        sd["output.weight"] = sd["tok_embeddings.weight"]
        int8 = Int8Parts(sd["tok_embeddings.weight"], sd["tok_embeddings.scales"])
        scales = module_state(INT8, int8, device=device, dtype=dtype)["scales"]
        sd["output.scales"] = arena.placed(scales) if arena is not None else scales
    else:
        add("output.weight")
    total = raw.args.n_layers + 1
    if progress is not None:
        progress(1, total)
    for i in range(raw.args.n_layers):
        p = f"layers.{i}."
        for key in _LAYER_SOURCES:
            add(p + key)
        sd[p + "attention_norm.weight"] = dense(p + "attention_norm.weight", hot=True)
        sd[p + "ffn_norm.weight"] = dense(p + "ffn_norm.weight", hot=True)
        trim_heap()
        if progress is not None:
            progress(i + 2, total)
    return sd


def _int8_by_rows(raw: RawCheckpoint, name: str, shape: tuple[int, ...],
                  first: int = 0) -> Int8Parts:
    """Per-row int8 of `shape[0]` rows of a tensor from row `first`, read a block of rows at a
    time (a large quantized embedding never exists whole in float32)."""
    assert raw.get_rows is not None
    n, k = shape
    q = torch.empty((n, k), dtype=torch.int8)
    scale = torch.empty(n)
    step = max(1, (16 << 20) // (4 * k))  # ~16 MB of float32 at a time
    for i in range(0, n, step):
        block = raw.get_rows(name, first + i, first + min(n, i + step))
        if block.shape != (min(n, i + step) - i, k):
            raise CheckpointError(f"{raw.where(name)}: tensor {name} has rows of shape "
                                  f"{tuple(block.shape[1:])}, expected ({k},)")
        check_finite(block, name, raw.where(name))
        part = quantize_int8(block)
        q[i:i + step], scale[i:i + step] = part.q, part.scale
    return Int8Parts(q, scale)


def _slice_int4(parts: Int4Parts, dim: int, start: int, stop: int) -> Int4Parts:
    """Rows (dim 0) or columns (dim 1, whole groups) start:stop of an int4 weight."""
    if dim == 0:
        return Int4Parts(parts.q[start:stop], parts.scale[start:stop], parts.zero[start:stop])
    g = parts.group_size
    if start % g or stop % g:
        raise CheckpointError(f"a tensor-parallel slice {start}:{stop} of an int4 weight must "
                              f"fall on its groups of {g} columns")
    return Int4Parts(parts.q[:, start:stop], parts.scale[:, start // g:stop // g],
                     parts.zero[:, start // g:stop // g])


def check_finite(t: torch.Tensor, name: str, where: str) -> None:
    """Raise CheckpointError naming the tensor when it holds NaN or an infinity.

    One reduction pass and no temporaries: min and max are NaN when any value is, and
    infinite when any value is."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    try:
        lo, hi = torch.aminmax(t)
        ok = bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    except RuntimeError:  # types without aminmax kernels (float8)
        ok = bool(torch.isfinite(t).all())
    if not ok:
        raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values "
                              "(a corrupt or badly converted checkpoint)")


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps freed conversion temporaries,
    which would otherwise add up to more than the weights); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _natural(name: str) -> tuple[object, ...]:
    return tuple(int(s) if s.isdigit() else s for s in name.split("."))
