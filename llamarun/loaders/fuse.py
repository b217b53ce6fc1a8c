"""From a layout-neutral RawCheckpoint to the fused state dict the model knows.

Every loader (Meta, HF, GGUF) produces Meta-named, unfused tensors in Meta's RoPE layout; the
checks, the dtype/device conversion and the Q/K/V and gate/up fusion happen here, tensor by
tensor, so that peak memory stays near one copy of the model in the target dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamarun.config import ModelArgs
from llamarun.errors import CheckpointError


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


_ALIGN = 64  # bytes


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Shape of every unfused Meta-named tensor for `args` (output.weight included)."""
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


def build_state_dict(raw: RawCheckpoint, *, dtype: torch.dtype, device: torch.device,
                     progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Read, check, convert and fuse every tensor into the model's state dict.

    progress, if given, is called after the embeddings and after each layer.
    """
    check_names(raw)
    shapes = expected_shapes(raw.args)

    def read(name: str) -> torch.Tensor:
        t = raw.get(name)
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"{raw.where(name)}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"expected {shapes[name]} from the config")
        if not t.is_floating_point():
            raise CheckpointError(f"{raw.where(name)}: tensor {name} has dtype {t.dtype}, "
                                  "expected floating point")
        return t

    def get(name: str) -> torch.Tensor:
        t = read(name).to(device=device, dtype=dtype)
        # A tensor still backed by the file (same dtype, mmapped) or by numpy sits wherever its
        # data happened to be; matmul kernels run measurably slower on weights that are not
        # 64-byte aligned, which a fresh allocation is.
        if not t.is_contiguous() or t.data_ptr() % _ALIGN:
            t = t.clone(memory_format=torch.contiguous_format)
        return t

    def fused(*names: str) -> torch.Tensor:
        # Copy each part straight into its rows of the fused tensor: no converted temporaries.
        rows = sum(shapes[n][0] for n in names)
        out = torch.empty((rows, shapes[names[0]][1]), dtype=dtype, device=device)
        start = 0
        for n in names:
            part = read(n)
            out[start:start + part.shape[0]].copy_(part)
            start += part.shape[0]
            del part
        return out

    sd: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": get("tok_embeddings.weight"),
        "norm.weight": get("norm.weight"),
    }
    if raw.args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    else:
        sd["output.weight"] = get("output.weight")
    total = raw.args.n_layers + 1
    if progress is not None:
        progress(1, total)
    for i in range(raw.args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = fused(
            p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight")
        sd[p + "attention.wo.weight"] = get(p + "attention.wo.weight")
        sd[p + "feed_forward.w13.weight"] = fused(
            p + "feed_forward.w1.weight", p + "feed_forward.w3.weight")
        sd[p + "feed_forward.w2.weight"] = get(p + "feed_forward.w2.weight")
        sd[p + "attention_norm.weight"] = get(p + "attention_norm.weight")
        sd[p + "ffn_norm.weight"] = get(p + "ffn_norm.weight")
        if progress is not None:
            progress(i + 2, total)
    return sd


def _natural(name: str) -> tuple[object, ...]:
    return tuple(int(s) if s.isdigit() else s for s in name.split("."))
