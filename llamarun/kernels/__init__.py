"""llamarun's own CPU kernels for decode-sized products, and the one place that selects them.

`linear.cpp` holds weight-streaming products for decode-sized M (bfloat16: MAX_ROWS rows; int8:
INT8_VNNI_MAX_ROWS; the 4-bit one and the AVX2 int8 one serve prefill chunks of up to
INT4_MAX_ROWS and INT8_AVX2_MAX_ROWS too, the 4-bit one on AMX int8 tiles from int4_amx_rows()
rows on where the CPU has them, with the same bits): bfloat16 weights with
AVX512-BF16 (`vdpbf16ps`, float32 accumulation), int8 weights with AVX512-VNNI (`vpdpbusd`,
activations quantized to int8 in blocks of 64 values, as llama.cpp's Q8 activations are in
blocks of 32) and, on CPUs with AVX2 but not AVX-512, int8 and 4-bit weights with AVX2
(`vpmaddubsw`, activations in int8 blocks of 32, as llama.cpp's Q8 x Q8 and Q4 x Q8 products),
where PyTorch's weight-only kernels have no fast path (its int4 one measured 2.7-3.1 GB/s of
weights there); the 4-bit kernel serves AVX-512 CPUs too, with AVX512-VNNI tiles (`vpdpbusd`,
the AVX2 tiles' bits) where the CPU has them. On AMD CPUs a one-row pass of the bf16, int8 and
(AVX-512) float32 kernels takes the weight rows one at a time, so each thread's weights stream in
address order (kernels.h's ROW_STREAM; the same bits as the 8-row blocks other CPUs and 2-8-row
passes take). It is compiled at first use with torch.utils.cpp_extension into
~/.cache/llamarun/kernels (a temporary folder without a home); without a compiler, on other
CPUs, or with LLAMARUN_KERNELS=0, every product takes PyTorch's path. Each output row is computed by the same arithmetic whatever the number of rows,
so a sequence's logits do not depend on the rest of its decode batch.

`attention.cpp` holds `attend`: float32 attention over a float32 or bfloat16 KV cache (and
`rope_write`, which fills it), every token of a pass
(decode rows, verifications, prompt chunks, whole prompts) over its own row's past, in one call
(AVX2; AVX-512 for the scores and the values' sums where the CPU has it). `rowwise.cpp` holds
the layers' other per-token ops (`rms_norm`, `silu_mul`; float32, and bfloat16 computed in
float32).
With them, a float32 token's result on CPU does not depend on its pass, on how its prompt was
cut into chunks, or on whether the pass ran compiled. `f32.cpp` (with `f32_kernel.h`, its code
for both vector widths) holds the float32 product: AVX-512 where the CPU has it, else AVX2,
every pass of up to F32_MAX_ROWS rows. `layer.cpp` holds `decode_layers`: consecutive layers of
an eager pass in one call, by the kernels above in the order the model's modules call them (the
same bits), where each of its ops would run one of them anyway (model.TransformerBlock asks
each product's module, through `dense_product`, `int8_product` and `int4_product`, and
`serves_layer` for the rest).

`dense_linear`, `int8_linear` and `int4_linear` (with `int4_layout`, which picks the weights'
layout at load) are the selection point of the products: `device.linear` and the quantized
modules call them and fall back to PyTorch's kernels when they return None; `serves_attention`
is the attention's (the model falls back to SDPA) and `serves_rowwise` the norm's and SwiGLU's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

from llamarun.errors import InvalidArgumentError

log = logging.getLogger(__name__)


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch.utils.cpp_extension's import-time warning "No CUDA runtime is found, using
    CUDA_HOME=...": a CUDA build of PyTorch (what `pip install torch` gives on Linux) on a
    machine without a GPU but with a CUDA toolkit logs it whenever the kernels load (every
    `llamarun` command) or torch.compile builds; there nothing is wrong, the CPU serves, and
    stderr is for llamarun's own one-line messages. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


# (before anything imports torch.utils.cpp_extension: the warning comes with the import)
logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())

ENV = "LLAMARUN_KERNELS"  # "0": PyTorch's kernels only; "1" or unset: ours where they serve
MAX_ROWS = 8  # decode batches; larger products go to PyTorch's GEMMs (measured up to 8 only)
# The AVX2 4-bit kernel also serves prefill: on its tiles (8 rows then) it measured 1.8-1.9x faster
# than dequantizing the weight into PyTorch's float32 GEMM for 512- and 1,024-token passes of the
# default model (README "CPU kernels"). Every pass the scheduler makes (at most 512 rows) runs it,
# so a token's products never depend on how many others its pass holds (a pass over the limit
# would round its activations differently: greedy tokens of a prompt prefilled together with 7
# others forked from those of the same prompt alone, measured).
INT4_MAX_ROWS = 4096
# The AVX2 int8 kernel (CPUs without VNNI) serves as many rows: against PyTorch's path past 8
# rows (`_weight_int8pack_mm`, then a dequantized GEMM) it measured 2.2-3.1x faster at 9 rows
# (the output head of 8 decode rows and a prompt chunk), 1.5-3.9x at 64 and 0.93-1.43x at 512
# (benchmarks/products.py shapes of the default model), and a row's logits then never depend
# on how many rows share its pass.
INT8_AVX2_MAX_ROWS = 4096
# The AVX512-VNNI int8 kernel serves up to this many: against the path past it (the weight
# dequantized into oneDNN's bfloat16 GEMM) it measured, on an Intel Xeon with AMX (2 threads,
# bfloat16 activations, medians of 5), 3.6x faster at 9 rows for the default model's 49152 x 576
# output head (1.8 against 6.5 ms), 2.1x at 16, 1.3x at 32 and 0.76x at 64; the 4 products of a
# SmolLM2 layer 3.6x / 2.2x / 1.2x / 0.74x and of a 1B-shaped one 4.2x / 2.4x / 1.2x / 0.78x at
# 9 / 16 / 32 / 64 rows. So the logits of up to 32 rows (8 decode rows and a prompt chunk's last,
# a verification batch) have one kernel's numbers whatever else their pass holds.
INT8_VNNI_MAX_ROWS = 32
# The float32 kernel (f32.cpp: AVX2, or AVX-512 where the CPU has it) serves every pass up to as
# many rows: against oneDNN (which float32 products take otherwise) it measured, on AVX2 CPUs,
# 2.3-2.7x faster for one row and 1.5-2.0x for 2-8 rows with the weights streamed from memory,
# 1.1-1.3x at 64 rows and 0.86-1.08x at 512; on an AVX-512 Intel Xeon 1.7-2.3x for one row,
# 1.4-2.0x for 2-8, 1.3-1.7x at 16, 0.93-1.3x at 64 and 0.65-0.85x at 512 (benchmarks/
# products.py, SmolLM2's shapes). One kernel for every pass size makes a token's float32
# products the same whatever its pass holds: a prompt prefilled whole or in chunks, a row
# decoded alone or beside 7 others, by a compiled step or eagerly.
F32_MAX_ROWS = 4096
SOURCES = [Path(__file__).with_name(name)
           for name in ("linear.cpp", "f32.cpp", "attention.cpp", "rowwise.cpp", "layer.cpp")]


def enabled() -> bool:
    """Whether LLAMARUN_KERNELS allows this package's kernels (unset or "1": yes, "0": no)."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise InvalidArgumentError(f"{ENV}={value!r} is not valid (use 0 or 1)")
    return value == "1"


def cache_dir() -> Path:
    """Where the compiled extension is kept, per torch version."""
    home = Path.home() if os.environ.get("HOME") else None
    base = (home / ".cache" if home is not None else Path(tempfile.gettempdir())) / "llamarun"
    return base / "kernels" / f"torch-{torch.__version__.replace('+', '-')}"


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled kernels, built on first use; None (logged once) where they cannot run."""
    if not _serves_cpu():
        return None  # nothing here runs on this CPU: do not build
    from torch.utils import cpp_extension

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder):
            ext = cpp_extension.load(
                name="llamarun_kernels", sources=[str(p) for p in SOURCES],
                build_directory=str(folder), extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or failed build: PyTorch's kernels serve
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("llamarun kernels unavailable, using PyTorch's (%s)", first)
        return None
    return ext


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an OS lock on the build folder while building: another llamarun process waits for
    the build to end. torch's own lock is a file, which a build killed midway (Ctrl-C in the
    first run) leaves behind, and every later build waits for it to go, forever: while this
    process holds the OS lock (released by the OS when a holder dies) such a file is stale,
    and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's file lock alone
        yield
        return
    with open(folder / "build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            log.warning("removing a build lock left by an interrupted build (%s)", stale)
            stale.unlink(missing_ok=True)
        yield


def _serves_cpu() -> bool:
    """Whether some kernel here runs on this CPU (AVX2 or AVX-512: the 4-bit one at least)."""
    avx512 = (torch.backends.cpu.get_cpu_capability() == "AVX512"
              and torch.cpu._is_avx512_bf16_supported())
    return avx512 or _int4_cpu()


def build_pending() -> bool:
    """Whether the kernels' first use here will build them (about a minute, once): the CLI
    says so before loading a model."""
    if not enabled() or _extension.cache_info().currsize or not _serves_cpu():
        return False
    return not any(cache_dir().glob("llamarun_kernels*.so"))


def _int4_cpu() -> bool:
    """A CPU the 4-bit and float32 kernels are for: AVX2 or AVX-512 (torch's capability). On
    AVX-512 the 4-bit one (then AVX2 code) measured 1.3-1.45x faster than PyTorch's own int4
    kernel for 1 to 512 rows (Intel Xeon with AVX512-BF16 and AMX, the 1B shape's matrices, 2
    threads); with AVX512-VNNI it runs VNNI tiles, and the float32 one AVX-512 code (see
    F32_MAX_ROWS)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _avx2_only() -> bool:
    """A CPU with AVX2 and no AVX-512 (torch's capability): the AVX2 int8 kernel is for these
    (AVX-512 CPUs with VNNI run the VNNI one)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def _constant_result(fn):  # noqa: ANN001, ANN202 (a decorator)
    """torch.compiler.assume_constant_result(fn) without importing torch._dynamo: that decorator
    only sets this attribute (tests/test_kernels.py checks it still does), and importing it costs
    every llamarun start 0.75 s and ~150 MiB (dynamo pulls in Triton where installed) although
    most commands never compile. Compiled graphs then take fn's result as a constant."""
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def _features() -> tuple[bool, bool, bool, bool]:
    """(AVX512-BF16, AVX512-VNNI, AVX2 without AVX-512, AVX2 or AVX-512 (the 4-bit and float32
    kernels)), as this CPU has them."""
    ext = _extension()
    if ext is None:
        return False, False, False, False
    bf16, vnni, avx2 = ext.cpu_features()
    return bool(bf16), bool(vnni), bool(avx2) and _avx2_only(), bool(avx2) and _int4_cpu()


@_constant_result
def f32_available() -> bool:
    """Whether the float32 kernel runs here (enabled, built, a CPU with AVX2 or AVX-512)."""
    return enabled() and _features()[3]


@_constant_result
def bf16_available() -> bool:
    """Whether the bfloat16 kernel runs here (enabled, built, and the CPU has AVX512-BF16)."""
    return enabled() and _features()[0]


@_constant_result
def int8_available() -> bool:
    """Whether the int8 kernel runs here (enabled, built, and the CPU has AVX512-VNNI, or AVX2
    without AVX-512: the same product with vpmaddubsw, activations in blocks of 32)."""
    return enabled() and (_features()[1] or _features()[2])


@_constant_result
def int8_max_rows() -> int:
    """The most rows int8_linear serves here (0 where it does not run)."""
    if not int8_available():
        return 0
    return INT8_VNNI_MAX_ROWS if _features()[1] else INT8_AVX2_MAX_ROWS


@_constant_result
def int4_available() -> bool:
    """Whether the 4-bit kernel runs here (enabled, built, a CPU with AVX2 or AVX-512)."""
    return enabled() and _features()[3]


# The ops make the kernels traceable by torch.compile (fullgraph): their schemas and fake forms
# are defined here, their CPU code by linear.cpp once built (a C++ registration: a Python custom
# op costs ~30 us a call). Eager calls go to the extension directly.
_LIB = torch.library.Library("llamarun", "DEF")  # kept: the ops live as long as it does
_LIB.define("bf16_linear(Tensor x, Tensor weight) -> Tensor")
_LIB.define("f32_linear(Tensor x, Tensor weight) -> Tensor")
_LIB.define("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor")
_LIB.define("int4_linear(Tensor x, Tensor weight, Tensor scales, Tensor zeros, int group, int n) -> Tensor")
_LIB.define("attend(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor pos, float scale) -> Tensor")
_LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIB.define("silu_mul(Tensor x) -> Tensor")


@torch.library.register_fake("llamarun::bf16_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("llamarun::f32_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("llamarun::int8_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("llamarun::int4_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
      group: int, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)  # (the weight's rows are padded to tiles)


@torch.library.register_fake("llamarun::rms_norm", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("llamarun::silu_mul", lib=_LIB)
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.register_fake("llamarun::attend", lib=_LIB)
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
      scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def _rows(x: torch.Tensor) -> int:
    return x.shape[:-1].numel()


def serves_dense(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether dense_linear(x, weight) runs this package's kernel (else it returns None)."""
    if x.device.type != "cpu" or weight.dim() != 2 or x.dtype != weight.dtype:
        return False
    if x.dtype == torch.float32:
        return 0 < _rows(x) <= F32_MAX_ROWS and f32_available()
    return x.dtype == torch.bfloat16 and 0 < _rows(x) <= MAX_ROWS and bf16_available()


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight.T by this package's kernels where they serve, else None.

    bfloat16 x and weight on CPUs with AVX512-BF16, 1..MAX_ROWS rows: measured 1.1-2.2x faster
    than F.linear there. float32 on AVX2 and AVX-512 CPUs, 1..F32_MAX_ROWS rows (see there). Elsewhere
    oneDNN or F.linear (benchmarks/products.py, README "CPU kernels").
    """
    if not serves_dense(x, weight):
        return None
    rows = x.reshape(-1, x.shape[-1])
    f32 = x.dtype == torch.float32
    if torch.compiler.is_compiling():
        op = torch.ops.llamarun.f32_linear if f32 else torch.ops.llamarun.bf16_linear
        y = op(rows, weight)
    else:  # the extension directly: no dispatcher on the eager path
        y = (_extension().f32_linear if f32 else _extension().bf16_linear)(rows, weight)
    return y.view(*x.shape[:-1], weight.shape[0])


def serves_int8(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether int8_linear(x, weight, ...) runs this package's kernel (else it returns None)."""
    return (x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu"
            and weight.dtype == torch.int8 and 0 < _rows(x) <= int8_max_rows())


def int8_linear(x: torch.Tensor, weight: torch.Tensor,
                scales: torch.Tensor) -> torch.Tensor | None:
    """x @ (weight * scales[:, None]).T by the int8 kernel where it serves, else None.

    It serves bfloat16 or float32 x on CPU for 1..int8_max_rows() rows: measured 1.3-2x faster
    than `_weight_int8pack_mm` for decode rows. Activations are quantized to int8 in blocks of
    64 values (VNNI) or 32 (AVX2), as llama.cpp's Q8 activations are (in blocks of 32).
    """
    if not serves_int8(x, weight):
        return None
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = torch.ops.llamarun.int8_linear(rows, weight, scales)
    else:  # the extension directly: no dispatcher on the eager path
        y = _extension().int8_linear(rows, weight, scales)
    return y.view(*x.shape[:-1], weight.shape[0])


def int4_layout(group_size: int) -> bool:
    """Whether 4-bit weights of this group size (the kernel takes 32 times a power of two) are
    best stored in int4_linear's layout (see int4_pack) on this machine's CPU; decided once,
    when a model loads."""
    return group_size >= 32 and group_size & (group_size - 1) == 0 and int4_available()


INT4_TILE = 16  # weight rows the 4-bit kernel computes together (its layout's tiles)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) uint8 values 0..15 -> int4_linear's layout, (ceil(N / 16) * 16, ceil(K / 64) * 32)
    uint8: rows in tiles of 16 (zero rows pad N), K padded with zeros to a multiple of 64; each
    tile a run of 512 bytes per 64 values p, 8 vectors of 64 bytes, vector v holding row r's
    doubleword at byte 4r: its byte j has value 64p + 4v + j in the low nibble and 64p + 32 +
    4v + j in the high one (see linear.cpp)."""
    n, k = q.shape
    ldk, tiles = -(-k // 64) * 64, -(-n // INT4_TILE)
    padded = torch.zeros(tiles * INT4_TILE, ldk, dtype=torch.uint8, device=q.device)
    padded[:n, :k] = q
    v = padded.view(tiles, INT4_TILE, ldk // 64, 2, 8, 4)  # (tile, r, p, nibble half, v, j)
    packed = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # (tile, r, p, v, j)
    return packed.permute(0, 2, 3, 1, 4).reshape(tiles * INT4_TILE, ldk // 2).contiguous()


def int4_groups_shape(n: int, k: int, group: int) -> tuple[int, int, int]:
    """The shape of int4_pack_groups' layout for an (n, k) weight: (tiles, G', 16), G' the groups
    of K padded to a multiple of 64 (the kernel reads 64 values at a time)."""
    padded_k = -(-k // 64) * 64
    return -(-n // INT4_TILE), -(-padded_k // group), INT4_TILE


def int4_pack_groups(t: torch.Tensor, k: int) -> torch.Tensor:
    """Scales or zeros t (N, G) of 4-bit weights with K = k -> int4_linear's layout, float16
    (tiles, G', 16) (int4_groups_shape): per tile of 16 rows, group-major, row r in lane r (one
    32-byte load per block in the kernel); zero rows pad N, zero groups G."""
    n, g = t.shape
    tiles, gp, _ = int4_groups_shape(n, k, k // g)
    padded = torch.zeros(tiles * INT4_TILE, gp, dtype=torch.float16, device=t.device)
    padded[:n, :g] = t
    return padded.view(tiles, INT4_TILE, gp).transpose(1, 2).contiguous()


def int4_unpack_groups(packed: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """int4_pack_groups' inverse: (n, groups) float16 (also traceable by torch.compile)."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n, :groups]


def int4_unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int4_pack's inverse, padding rows included: (ceil(N / 16) * 16, K) uint8 values 0..15
    (also traceable by torch.compile)."""
    rows, half = packed.shape
    tiles, pairs = rows // INT4_TILE, half // 32
    v = packed.view(tiles, pairs, 8, INT4_TILE, 4).permute(0, 3, 1, 2, 4)  # (tile, r, p, v, j)
    q = torch.stack([v & 0x0F, v >> 4], dim=3)  # (tile, r, p, nibble half, v, j)
    return q.reshape(rows, pairs * 64)[:, :k]


# From this many rows on, a bfloat16 4-bit product on a CPU with AMX is a bfloat16 GEMM (oneDNN's,
# on AMX tiles) over the weight dequantized by int4_dequant, not int4_linear (which runs on the
# AMX int8 tiles from int4_amx_rows() rows on: the bits of its decode rows, but each 32-value
# block's sums go through memory to be scaled, where the GEMM accumulates in its tiles). Measured
# on an Intel Xeon with AMX, 2 threads, the 4 products of a 1B-shaped layer (Q4_0-like, medians of
# 5): int4_linear 3.9 ms at 16 rows, 10.0 at 64, 18.4-20.0 at 128, 66 at 512; dequantized (into a
# reused buffer) + GEMM 14.3, 17.5, 19.5-21.2 and 42-68 ms; SmolLM2's shapes alike (0.73 against
# 1.16 ms at 64 rows, 1.29-1.55 against 1.33-1.47 at 128). A 512-token prompt of the 1B Q4_0 model
# prefilled at 401 tok/s on the AMX tiles against 543 through the GEMM (benchmarks/compare.py).
# So the 4-bit products of passes up to 127 rows (decode batches, prompt chunks beside them,
# short prompts) have the numbers of the decode kernel; longer prompts those of the GEMM.
INT4_GEMM_ROWS = 128
INT4_GEMM_MAX_WEIGHTS = 1 << 26  # larger matrices (an 8B model's output head) keep the kernel
_workspace = threading.local()  # dequantized weights, reused: fresh pages cost more than the work


def scratch(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """An (n, k) buffer of this thread's, reused by the next call for the same dtype: for a
    weight dequantized just before its product (on CPU, a fresh buffer of that size costs
    more in page faults than the dequantizing itself)."""
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n * k:
        buf = bufs[dtype] = torch.empty(n * k, dtype=dtype)
    return buf[:n * k].view(n, k)


_pass = threading.local()  # what shortest_part says of the eager pass running in this thread


class shortest_part:  # noqa: N801 (a context manager, used as a function)
    """Within: the eager pass this thread runs packs sequences' parts of `tokens` tokens or more
    (model.Transformer.forward_spans says so). A 4-bit product then takes the GEMM only if every
    part is long enough for it alone (int4_gemm_serves): a short prompt packed into one pass
    with others keeps the numbers it gets alone (the 4-bit kernel's), however many rows the
    pass has. (A class: contextlib's generator-based manager took about 0.7% of a SmolLM2
    decode token, py-spy.)"""

    __slots__ = ("tokens", "before")

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def __enter__(self) -> None:
        self.before = getattr(_pass, "shortest", None)
        _pass.shortest = self.tokens

    def __exit__(self, *exc: object) -> None:
        _pass.shortest = self.before


def int4_gemm_serves(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether x's product with a 4-bit (n, k) weight is best a bfloat16 GEMM over
    int4_dequant's weight: bfloat16 x of INT4_GEMM_ROWS rows or more, each of its pass's
    sequence parts that long too (shortest_part), a CPU with AMX, eager passes."""
    if torch.compiler.is_compiling():  # (first: nothing below is traced, or guarded on)
        return False
    shortest = getattr(_pass, "shortest", None)
    return (x.dtype == torch.bfloat16 and _rows(x) >= INT4_GEMM_ROWS
            and (shortest is None or shortest >= INT4_GEMM_ROWS)
            and n * k <= INT4_GEMM_MAX_WEIGHTS and _amx() and int4_available())


@functools.cache
def _amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def int4_dequant(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                 n: int, k: int) -> torch.Tensor:
    """The (n, k) bfloat16 weight of int4_linear's operands (int4_available() must hold), in
    this thread's scratch buffer: valid until the thread's next use of it."""
    return _extension().int4_dequant(weight, scales, zeros, group, n, k,
                                     scratch(n, k, torch.bfloat16))


@functools.cache
def int4_amx_rows() -> int | None:
    """From how many rows on the 4-bit kernel computes a pass on AMX tiles here (the same bits
    as its AVX512-VNNI tiles; linear.cpp measured and decides), None where it cannot: a CPU
    without AMX-INT8, or an OS that does not let the process use the tiles."""
    ext = _extension() if int4_available() else None
    return int(ext.int4_amx_rows()) if ext is not None and ext.amx_ready() else None


def int8_dequant(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """weight (n, k) int8 times scales (n,), bfloat16, in this thread's scratch buffer (the
    numbers of weight.to(bfloat16) * scales.to(bfloat16)[:, None]); None where the kernels do
    not run here."""
    if weight.device.type != "cpu" or not int4_available():  # (the same AVX2 code's CPUs)
        return None
    n, k = weight.shape
    return _extension().int8_dequant(weight, scales.to(torch.bfloat16),
                                     scratch(n, k, torch.bfloat16))


def serves_int4(x: torch.Tensor) -> bool:
    """Whether int4_linear(x, ...) runs this package's kernel (else it returns None)."""
    return (x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu"
            and 0 < _rows(x) <= INT4_MAX_ROWS and int4_available())


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group: int, n: int) -> torch.Tensor | None:
    """x @ W.T (n outputs) with W[n, k] = (q - 8) * scales[n, k // group] + zeros[n, k // group],
    q in int4_pack's layout and scales and zeros in int4_pack_groups' (zeros empty: all 0, as
    a Q4_0 weight's), by the 4-bit kernel where it serves (bfloat16 or float32 x on CPU,
    1..INT4_MAX_ROWS rows; AVX2 or AVX512-VNNI tiles), else None. Activations are quantized to
    int8 in blocks of 32 values."""
    if not serves_int4(x):
        return None
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = torch.ops.llamarun.int4_linear(rows, weight, scales, zeros, group, n)
    else:  # the extension directly: no dispatcher on the eager path
        y = _extension().int4_linear(rows, weight, scales, zeros, group, n)
    return y.view(*x.shape[:-1], n)


@_constant_result
def attend_available() -> bool:
    """Whether `attend` runs here (enabled, built, and the CPU has AVX2 and FMA)."""
    return enabled() and _attend_cpu()


@functools.cache
def _attend_cpu() -> bool:
    ext = _extension()
    return ext is not None and bool(ext.attend_supported())


def serves_cache(k_cache: torch.Tensor) -> bool:
    """Whether attend and rope_write serve this KV cache: float32 or bfloat16 on CPU (see
    device.attention_dtype), a head size that is a multiple of 8. Attention over it then
    computes in float32 (the queries' dtype)."""
    return (k_cache.dtype in (torch.float32, torch.bfloat16) and k_cache.device.type == "cpu"
            and k_cache.shape[-1] % 8 == 0 and attend_available())


def serves_attention(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether attend(q, k_cache, ...) runs this package's kernel: float32 queries over a cache
    it serves (serves_cache)."""
    return q.dtype == torch.float32 and q.device.type == "cpu" and serves_cache(k_cache)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
           pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Every token t of q (T, heads, head_dim) attends positions 0..pos[t] of cache row
    rows[t] of k_cache and v_cache (rows, kv heads, positions, head_dim), in one call (check
    serves_attention first). Each token's result depends only on its query and its row's
    past, bit for bit: what a batch holds besides changes nothing."""
    if torch.compiler.is_compiling():
        return torch.ops.llamarun.attend(q, k_cache, v_cache, rows, pos, scale)
    return _extension().attend(q, k_cache, v_cache, rows, pos, scale)


def serves_rope(qkv: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether rope_write(qkv, ..., k_cache, ...) runs this package's kernel: float32 or
    bfloat16 qkv into a cache attend serves (serves_cache)."""
    return (qkv.dtype in (torch.float32, torch.bfloat16) and qkv.device.type == "cpu"
            and serves_cache(k_cache))


def rope_write(qkv: torch.Tensor, freqs: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
               n_heads: int) -> torch.Tensor:
    """Rotate the query and key heads of qkv (T, (n_heads + 2 kv heads) * head_dim: each
    token's query, key and value heads) by freqs (T, head_dim // 2, 2: each token's cos and
    sin), write each token's keys and values at pos[t] of cache row rows[t] (k_cache, v_cache:
    (rows, kv heads, positions, head_dim), float32 or bfloat16), and return the queries
    (T, n_heads, head_dim), float32 (check serves_rope first; eager passes only).

    The numbers are those of rope.apply_rope on qkv's heads into float32 (the same products
    and sums; bfloat16 heads rotated in float32, not rounded back) written by index_put (which
    rounds them once into a bfloat16 cache), as compiled passes compute them: one call instead
    of about 20 ops."""
    return _extension().rope_write(qkv, freqs, k_cache, v_cache, rows, pos, n_heads)


def serves_rowwise(*tensors: torch.Tensor) -> bool:
    """Whether rms_norm and silu_mul run this package's kernels on these tensors: all float32 or
    all bfloat16 (computed in float32) on CPU, where the attention kernel runs (the same
    instructions)."""
    dtype = tensors[0].dtype
    return (dtype in (torch.float32, torch.bfloat16)
            and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors)
            and attend_available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x ** 2, -1) + eps) by the kernel (check serves_rowwise first).

    Eager and compiled passes both call it and silu_mul: they are the parts of a layer that
    torch.compile's code and eager PyTorch compute with different roundings (the norm's sums of
    squares add in different orders; silu's exp differs), so with them a prompt chunk prefilled
    inside a compiled decode pass gets, bit for bit, the logits it gets prefilled alone. Each
    row is computed alone, by the same instructions whatever the number of rows."""
    if torch.compiler.is_compiling():
        return torch.ops.llamarun.rms_norm(x, weight, eps)
    return _extension().rms_norm(x, weight, eps)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x (..., 2H) holding gate then up, by the kernel (see rms_norm)."""
    if torch.compiler.is_compiling():
        return torch.ops.llamarun.silu_mul(x)
    return _extension().silu_mul(x)


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """logits.max(dim=-1).indices (the first index where several values tie; NaN the largest)
    by the kernel where it serves (float32 on CPU, eager), else None. torch's took 63 us for a
    128,256-entry row and up to three times that right after the head's product (AMD EPYC),
    1.5-2.5% of a 1B-shaped model's decode token; the kernel's 13."""
    if (logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() < 1
            or logits.shape[-1] == 0 or torch.compiler.is_compiling() or not attend_available()):
        return None
    return _extension().argmax_rows(logits)


# A product as decode_layers takes it: (kind, a, b, c, group, n), kind DENSE (a the weight),
# INT8 (a the weight, b its scales) or INT4 (a, b, c: int4_linear's weight, scales and zeros; n
# outputs); unused operands repeat a used one.
Product = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int]
DENSE, INT8, INT4 = 0, 1, 2
fuse_layers = True  # False: every layer op by op, as on other devices (tests compare the two)


def dense_product(x: torch.Tensor, weight: torch.Tensor) -> Product | None:
    """The product dense_linear(x, weight) computes, for decode_layers; None where no kernel here
    serves it."""
    return (DENSE, weight, weight, weight, 0, weight.shape[0]) if serves_dense(x, weight) else None


def int8_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> Product | None:
    """The product int8_linear(x, weight, scales) computes, for decode_layers (or None)."""
    return (INT8, weight, scales, scales, 0, weight.shape[0]) if serves_int8(x, weight) else None


def int4_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group: int, n: int) -> Product | None:
    """The product int4_linear(x, ...) computes, for decode_layers (or None)."""
    return (INT4, weight, scales, zeros, group, n) if serves_int4(x) else None


def layer_pass(x: torch.Tensor,
               dtype: torch.dtype | None = None) -> tuple | None:  # type: ignore[type-arg]
    """What decides, besides the model's own modules, whether a layer of x's pass can be one
    decode_layers call and with which products: None where none can (a compiled pass, the
    kernels off, fuse_layers off), else a key (dtype, device, rows, the pass's shortest part:
    see int4_gemm_serves) under which the model may keep its layers' answers
    (model.Transformer._parts). x: the pass's hidden states (..., dim), or with `dtype` (theirs)
    its token ids.

    Compiled passes keep the layer op by op: inductor's own code between the kernels (the
    rotation and cache write, the residual adds, in its reused buffers) measured 3-4% faster
    than decode_layers' there (SmolLM2's compiled decode, BF16 and Q4_0; the 1B shape the
    same), with the same numbers."""
    if not fuse_layers or torch.compiler.is_compiling() or not enabled():
        return None
    rows = x.numel() if dtype is not None else _rows(x)
    return dtype or x.dtype, x.device.type, rows, getattr(_pass, "shortest", None)


def serves_layer(x: torch.Tensor, k_cache: torch.Tensor, *norms: torch.Tensor) -> bool:
    """Whether decode_layers can run a layer of a pass like x's (layer_pass not None) over this
    cache with these norms' weights: what rms_norm, silu_mul (serves_rowwise), rope_write and
    attend (serves_cache) need, float32 or bfloat16 x; its products are the caller's to check
    (*_product)."""
    return serves_rowwise(x, *norms) and serves_cache(k_cache)


class LayerOperands(NamedTuple):
    """What decode_layers needs of one layer that stays the same from pass to pass."""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    eps: float
    products: tuple[Product, Product, Product, Product]  # Q/K/V, output, gate/up, down
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    n_heads: int
    scale: float


class HeadOperands(NamedTuple):
    """The model's final norm and output product, for decode_logits."""

    norm: torch.Tensor
    eps: float
    product: Product


def layer_stack(layers: Sequence[LayerOperands], head: HeadOperands | None = None,
                embedding: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
    """Consecutive layers for decode_layers: an object of the extension holding each layer's
    operands (made once per kind of pass: model.Transformer); with the model's `head` after
    the last of them, for decode_logits too; with its `embedding` (table, scales: rows of the
    layers' dtype and no scales, or int8 rows and a float32 scale each) before the first, so
    that decode_layers and decode_logits take the pass's token ids."""
    stack = _extension().LayerStack()
    for op in layers:
        stack.add(op.attn_norm, op.ffn_norm, op.eps, list(op.products), op.k_cache, op.v_cache,
                  op.n_heads, op.scale)
    if head is not None:
        stack.set_head(head.norm, head.eps, head.product)
    if embedding is not None:
        stack.set_embedding(*embedding)
    return stack


def decode_layers(x: torch.Tensor, stack: Any, freqs: torch.Tensor, rows: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
    """Consecutive transformer layers (a layer_stack) over the tokens of x (..., dim) in one
    call (layer.cpp), each layer rms_norm, the Q/K/V product, rope_write, attend, the output
    product, the residual add, rms_norm, the gate/up product, silu_mul, the down product, the
    residual add: the same kernels in the same order as the model's modules call them, so the
    same numbers (check serves_layer, and that each product is the one its module computes:
    model.TransformerBlock.fused_operands). freqs is the RoPE table (positions, head size / 2,
    2), of which token t takes row pos[t]. x may be the pass's token ids (int64) instead, where
    the stack holds the embedding (layer_stack): their rows of it, as the model's embedding
    module gives them, are the first layer's input (in Python the embedding's ops took 37 us of
    a SmolLM2 decode token). One call instead of about 15 ops a layer: SmolLM2's
    eager decode measured 14-45% faster (float32 to Q4_0, benchmarks/compare.py against the ops
    one by one, README "How generation works"); one call for all layers instead of one a layer
    saves the Python between them. Eager passes only (layer_pass)."""
    return _extension().decode_layers(x, stack, freqs, rows, pos)


def decode_logits(x: torch.Tensor, stack: Any, freqs: torch.Tensor, rows: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
    """decode_layers, then the model's final norm and output product (the stack's head, see
    layer_stack) in the same call: float32 logits (..., vocab) of every token of x, the same
    numbers as rms_norm, the product and .float() one by one. Those three cost a SmolLM2
    decode token about 60 us of Python and thread starts around the product's own time
    (check serves_rowwise for the norm and the product's *_product, as for the layers)."""
    return _extension().decode_logits(x, stack, freqs, rows, pos)


def summary(device: torch.device) -> str:
    """Which kernels a model's products run on `device`, in words (`llamarun info`)."""
    if device.type != "cpu":
        return "PyTorch's"
    if not enabled():
        return f"PyTorch's ({ENV}=0)"
    bf16, vnni, avx2, int4 = _features()
    ours = [name for name, on in (("float32", int4), ("bf16", bf16), ("int8", vnni or avx2),
                                  ("int4", int4)) if on]
    if not ours:
        return "PyTorch's (none of llamarun's serves this CPU)"
    isa = "AVX-512" if bf16 or vnni else "AVX2"
    limits = {"float32": F32_MAX_ROWS, "bf16": MAX_ROWS, "int8": int8_max_rows(),
              "int4": INT4_MAX_ROWS}
    by_limit: dict[int, list[str]] = {}
    for name in ours:
        by_limit.setdefault(limits[name], []).append(name)
    rows = ", ".join(f"{' and '.join(names)}: passes of 1-{limit} rows"
                     for limit, names in sorted(by_limit.items(), reverse=True))
    return f"llamarun's {isa} ones for {', '.join(ours)} weights ({rows}), PyTorch's for the rest"
