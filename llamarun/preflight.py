"""Memory preflight: what a model will take on its device, checked before anything is built.

From the config alone (and the storage plan the loaders make from it) this computes the bytes of
the weights, the KV cache and the RoPE table, and compares them with the memory available on the
target device, so that a config claiming 10^7 layers or a `--max-seq-len` of 10^30 ends in one
line instead of an out-of-memory kill or a minutes-long loop. A refusal gives both numbers and
what would fit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from llamarun.config import ModelArgs
from llamarun.device import attention_dtype
from llamarun.errors import CheckpointError, ConfigError
from llamarun.quant import WeightFormat

log = logging.getLogger(__name__)

# Host bytes each layer costs beyond its tensors (the Python modules of a block, its state-dict
# entries): measured about 63 KB with torch 2.13.
LAYER_OVERHEAD = 64 << 10
TENSORS_PER_LAYER = 9  # wq, wk, wv, wo, w1, w2, w3 and two norms
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a loaded model takes on its device, by part."""

    weights: int
    kv_cache: int
    rope: int
    overhead: int  # Python objects per layer (host memory)

    @property
    def total(self) -> int:
        """All parts together."""
        return self.weights + self.kv_cache + self.rope + self.overhead


def check_plausible(args: ModelArgs, *, n_tensors: int, source: str) -> None:
    """Refuse a config that asks for more layers than the checkpoint has tensors for.

    O(1), and called by the readers before anything iterates over the layers: a config claiming
    10^7 layers would otherwise build a table of 9 x 10^7 tensor names (gigabytes, minutes).
    """
    if args.n_layers * TENSORS_PER_LAYER > n_tensors + 2 * TENSORS_PER_LAYER:
        raise ConfigError(f"{source}: the config has {args.n_layers} layers, but the checkpoint "
                          f"holds only {n_tensors} tensors ({TENSORS_PER_LAYER} per layer needed)")


def matrix_bytes(out_features: int, in_features: int, fmt: WeightFormat,
                 dtype: torch.dtype) -> int:
    """Bytes of one (out, in) weight stored as `fmt` (dense in `dtype`, int8 per row, or int4 in
    groups with a float32 scale and zero per group)."""
    n = out_features * in_features
    if fmt.kind == "int8":
        return n + 4 * out_features
    if fmt.kind == "int4":
        return n // 2 + 8 * (n // max(1, fmt.group_size))
    return n * _itemsize(dtype)


def weight_bytes(args: ModelArgs, dtype: torch.dtype,
                 formats: Mapping[str, WeightFormat] | None = None, *, world: int = 1) -> int:
    """Bytes of every weight of `args` stored as `formats` plans (all dense when None).

    With tensor parallelism (`world` ranks) the matrices are split and the norms replicated.
    Per-layer formats are read from layer 0 (they are planned alike for every layer).
    """
    from llamarun.quant import DENSE

    formats = formats or {}
    a = args
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim

    def fmt(name: str) -> WeightFormat:
        return formats.get(name, DENSE)

    layer = (matrix_bytes(q + 2 * kv, a.dim, fmt("layers.0.attention.wqkv.weight"), dtype)
             + matrix_bytes(a.dim, q, fmt("layers.0.attention.wo.weight"), dtype)
             + matrix_bytes(2 * a.hidden_dim, a.dim, fmt("layers.0.feed_forward.w13.weight"), dtype)
             + matrix_bytes(a.dim, a.hidden_dim, fmt("layers.0.feed_forward.w2.weight"), dtype))
    emb = matrix_bytes(a.vocab_size, a.dim, fmt("tok_embeddings.weight"), dtype)
    out = 0 if a.tie_embeddings else matrix_bytes(a.vocab_size, a.dim, fmt("output.weight"), dtype)
    norms = (2 * a.n_layers + 1) * a.dim * _itemsize(dtype)
    return (a.n_layers * layer + emb + out) // max(1, world) + norms


def kv_cache_bytes(args: ModelArgs, *, max_seq_len: int, slots: int, dtype: torch.dtype,
                   world: int = 1) -> int:
    """Keys and values of every layer: 2 x layers x slots x kv heads x positions x head_dim."""
    heads = -(-args.n_kv_heads // max(1, world)) if world > 1 else args.n_kv_heads
    return (2 * args.n_layers * slots * heads * max_seq_len * args.head_dim * _itemsize(dtype))


def rope_bytes(args: ModelArgs, *, max_seq_len: int) -> int:
    """The cos/sin table (float32, max_seq_len x head_dim/2 x 2) and the int64 positions."""
    return max_seq_len * (args.head_dim // 2) * 2 * 4 + max_seq_len * 8


def memory_need(args: ModelArgs, *, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                slots: int = 1, formats: Mapping[str, WeightFormat] | None = None,
                world: int = 1) -> MemoryNeed:
    """What loading `args` with these settings takes on `device`."""
    return MemoryNeed(
        weights=weight_bytes(args, dtype, formats, world=world),
        kv_cache=kv_cache_bytes(args, max_seq_len=max_seq_len, slots=slots,
                                dtype=attention_dtype(device, dtype), world=world),
        rope=rope_bytes(args, max_seq_len=max_seq_len),
        overhead=args.n_layers * LAYER_OVERHEAD if device.type == "cpu" else 0,
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new model on `device` (None when it cannot be told).

    CUDA: the driver's free memory. Host: MemAvailable from /proc/meminfo (else free pages from
    sysconf), capped by a cgroup's limit and by this process's address-space limit.
    """
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except (RuntimeError, AssertionError):
            return None
    candidates = [v for v in (_meminfo_available(), _cgroup_available(), _rlimit_available())
                  if v is not None]
    return min(candidates) if candidates else None


def check_memory(args: ModelArgs, *, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                 slots: int = 1, formats: Mapping[str, WeightFormat] | None = None,
                 world: int = 1, source: str = "", available: int | None = None) -> MemoryNeed:
    """Raise CheckpointError when the model will not fit on `device`, saying what would.

    `available` overrides the measured free memory (tests). Returns what was computed.
    """
    need = memory_need(args, device=device, dtype=dtype, max_seq_len=max_seq_len, slots=slots,
                       formats=formats, world=world)
    free = available_bytes(device) if available is None else available
    if free is None or need.total <= free:
        return need
    where = f"{source}: " if source else ""
    slot_text = f" x {slots} slots" if slots > 1 else ""
    parts = (f"weights {gib(need.weights)} ({_DTYPE_NAMES.get(dtype, dtype)}) + KV cache "
             f"{gib(need.kv_cache)} ({max_seq_len} positions{slot_text}) + RoPE table "
             f"{gib(need.rope)}")
    if need.overhead:
        parts += f" + {gib(need.overhead)} for {args.n_layers} layers"
    hints = _what_fits(args, need, free, device=device, dtype=dtype, max_seq_len=max_seq_len,
                       slots=slots, world=world)
    raise CheckpointError(f"{where}not enough memory on {device.type}: the model needs "
                          f"{gib(need.total)} ({parts}), {gib(free)} available"
                          + (f"; would fit: {hints}" if hints else "; nothing smaller would fit"))


def _what_fits(args: ModelArgs, need: MemoryNeed, free: int, *, device: torch.device,
               dtype: torch.dtype, max_seq_len: int, slots: int, world: int) -> str:
    """Settings that would fit in `free` bytes: a shorter cache, else a smaller dtype or
    quantization (with the cache no longer than the model's context, at most 4096)."""
    fixed = need.weights + need.overhead
    if free > fixed:
        longest = _longest_cache(args, free - fixed, device=device, dtype=dtype, slots=slots,
                                 world=world, limit=max_seq_len - 1)
        if longest >= 2:
            return f"--max-seq-len {longest}"
    seq = min(max_seq_len, args.max_seq_len, 4096)
    hints = []
    with_seq = f" with --max-seq-len {seq}" if seq < max_seq_len else ""
    if dtype == torch.float32:
        half = memory_need(args, device=device, dtype=torch.bfloat16, max_seq_len=seq,
                           slots=slots, world=world)
        if half.total <= free:
            hints.append(f"--dtype bfloat16{with_seq}")
    int8, int4 = WeightFormat("int8"), WeightFormat("int4", 32)
    for mode, fmt in (("int8", int8), ("int4", int4)):
        formats = {f"layers.0.{n}": fmt for n in ("attention.wqkv.weight", "attention.wo.weight",
                                                   "feed_forward.w13.weight",
                                                   "feed_forward.w2.weight")}
        formats["tok_embeddings.weight"] = formats["output.weight"] = int8
        quant = memory_need(args, device=device, dtype=dtype, max_seq_len=seq, slots=slots,
                            formats=formats, world=world)
        if quant.total <= free:
            hints.append(f"--quantize {mode}{with_seq}")
            break
    return ", or ".join(hints)


def _longest_cache(args: ModelArgs, room: int, *, device: torch.device, dtype: torch.dtype,
                   slots: int, world: int, limit: int) -> int:
    """The longest KV cache that fits in `room` bytes, at most `limit` (and at most the model's
    context when that fits), rounded down to a multiple of 256 from 256 on."""
    per_position = (kv_cache_bytes(args, max_seq_len=1, slots=slots,
                                   dtype=attention_dtype(device, dtype), world=world)
                    + rope_bytes(args, max_seq_len=1))
    longest = min(limit, room // per_position)
    if longest >= args.max_seq_len:
        longest = min(longest, args.max_seq_len)
    elif longest >= 256:
        longest = longest // 256 * 256
    return longest


def gib(n: int) -> str:
    """Bytes in GiB (MiB below one GiB), readable however absurd the number."""
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 10**300:
        return f"about 10^{len(str(n)) - 1} bytes"
    value = n / (1 << 30)
    return f"{value:.1f} GiB" if value < 1e6 else f"{value:.3g} GiB"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when it has a limit."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def _rlimit_available() -> int | None:
    """The address space this process may still map under RLIMIT_AS, when one is set."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def warn_long_context(args: ModelArgs, max_seq_len: int, source: str) -> None:
    """Log a warning when the KV cache is longer than the context the model was trained for."""
    if max_seq_len > args.max_seq_len:
        log.warning("%s: --max-seq-len %d is beyond the model's trained context of %d tokens; "
                    "output past %d tokens may degrade", source, max_seq_len, args.max_seq_len,
                    args.max_seq_len)

