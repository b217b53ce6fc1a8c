"""Quantized weight products of decode-sized batches on CUDA: Triton kernels reading weights once.

int8: y = x @ (q * scale[:, None]).T for q (N, K) int8 with one scale per output row; 4-bit
(Int4Linear's "plain" layout, where PyTorch's tensor-core kernel does not serve: GPUs below
compute capability 8.0, or shapes its tiles cannot take): y = x @ W.T with W[n, k] =
(q - 8) * s[g, n] + z[g, n], g = k // group, q two per byte (low nibble: the even column). x has
1 to MAX_ROWS rows. Each program takes BLOCK_N = 8 output rows and walks K in blocks, converting
the stored values to float32 in registers (the 4-bit ones with their group's scale and zero),
multiplying them by the activations in float32 and summing along K; the int8 row scale
multiplies each output once at the end. So a product reads the stored bytes once, where
dequantizing first (PyTorch's path, `q.to(bf16) * scale`) writes and reads a bfloat16 copy of
the whole matrix on every call: 5 bytes of traffic per int8 weight instead of 1 (4.5 instead
of 0.5 for 4-bit). PyTorch's CUDA `_weight_int8pack_mm` (one thread per output) measured 2-60x
slower than that dequantized product (README, "On CUDA"). The arithmetic is the weight-only one:
activations stay in float (no int8 activations: quantizing each token's row to int8 for cuBLAS's
int8 GEMM, `torch._int_mm`, raised SmolLM2 Q8_0's perplexity from 12.74 to 13.13).

Triton comes with PyTorch's CUDA wheels; where it is missing (or the GPU is older than
MIN_CAPABILITY) these products stay dequantized (llamarun.device.cuda_triton_kernels decides). On
a CPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import functools

import torch

MAX_ROWS = 16  # past this (prompt chunks) a GEMM on the dequantized weight is compute-bound anyway
MIN_CAPABILITY = (7, 0)  # Triton's oldest GPUs (the kernels use no tensor cores)
BLOCK_N = 8  # output rows per program: a 2,048-row matrix spreads over 256 programs
ELEMENTS = 4096  # rows x BLOCK_N x BLOCK_K products held per program and step


@functools.cache
def _int8_kernel():  # the @triton.jit function, built at first use (the interpreter is chosen then)
    import triton
    import triton.language as tl

    @triton.jit
    def int8_rows(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        wrow = rn.to(tl.int64) * K  # a 256k-vocabulary head has more than 2**31 values
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + wrow[:, None] + rk[None, :],
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        y = acc * scale[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return int8_rows


@functools.cache
def _int4_kernel():  # as _int8_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def int4_rows(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, GROUP,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        nbytes = K // 2  # a row's bytes: value 2b in the low nibble of byte b, 2b + 1 in the high
        wrow = rn.to(tl.int64) * nbytes
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b0 in range(0, nbytes, BLOCK_K // 2):
            rb = b0 + tl.arange(0, BLOCK_K // 2)
            wmask = (rn[:, None] < N) & (rb[None, :] < nbytes)
            packed = tl.load(w_ptr + wrow[:, None] + rb[None, :], mask=wmask, other=0)
            # scales_and_zeros (K // GROUP, N, 2): both values of a byte share a group
            sz = (2 * rb[None, :] // GROUP) * N * 2 + rn[:, None] * 2
            scale = tl.load(sz_ptr + sz, mask=wmask, other=0.0).to(tl.float32)
            zero = tl.load(sz_ptr + sz + 1, mask=wmask, other=0.0).to(tl.float32)
            lo = ((packed & 15).to(tl.float32) - 8.0) * scale + zero
            hi = ((packed >> 4).to(tl.float32) - 8.0) * scale + zero
            xmask = (rm[:, None] < M) & (rb[None, :] < nbytes)
            xe = tl.load(x_ptr + rm[:, None] * K + 2 * rb[None, :], mask=xmask, other=0.0)
            xo = tl.load(x_ptr + rm[:, None] * K + 2 * rb[None, :] + 1, mask=xmask, other=0.0)
            acc += tl.sum(xe.to(tl.float32)[:, None, :] * lo[None, :, :], axis=2)
            acc += tl.sum(xo.to(tl.float32)[:, None, :] * hi[None, :, :], axis=2)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return int4_rows


def blocks(rows: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) for a product of `rows` rows: the rows padded to a power of two, and K
    steps that keep each program's ELEMENTS products (wider steps for fewer rows)."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"the CUDA kernels take 1 to {MAX_ROWS} rows, not {rows}")
    block_m = 1 << (rows - 1).bit_length()
    return block_m, ELEMENTS // (block_m * BLOCK_N)


def _launch(kernel, x: torch.Tensor, n: int, weights: tuple[torch.Tensor, ...],
            numbers: tuple[int, ...] = ()) -> torch.Tensor:
    """y (M, n) in x's dtype: kernel(x, *weights, y, M, n, K, *numbers) over n // BLOCK_N
    programs, x (M, K)."""
    rows, k = x.shape
    block_m, block_k = blocks(rows)
    x = x.contiguous()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    kernel[((n + BLOCK_N - 1) // BLOCK_N,)](x, *(w.contiguous() for w in weights), y, rows, n, k,
                                            *numbers, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
                                            BLOCK_K=block_k)
    return y


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (weight (N, K) int8 * scales (N,)).T -> (M, N) in x's dtype, by the kernel."""
    k, n = x.shape[1], weight.shape[0]
    if weight.dtype != torch.int8 or weight.shape[1] != k or scales.shape != (n,):
        raise ValueError(f"int8_mm: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, scales {tuple(scales.shape)} do not fit")
    return _launch(_int8_kernel(), x, n, (weight, scales))


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N) in x's dtype, by the kernel: W in Int4Linear's plain layout,
    weight (N, K // 2) uint8 and scales_and_zeros (K // group_size, N, 2)."""
    k = x.shape[1]
    n = weight.shape[0]
    if (weight.dtype != torch.uint8 or k % 2 or group_size % 2 or k % group_size
            or weight.shape[1] != k // 2
            or scales_and_zeros.shape != (k // group_size, n, 2)):
        raise ValueError(f"int4_mm: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, scales_and_zeros {tuple(scales_and_zeros.shape)}, "
                         f"group {group_size} do not fit")
    return _launch(_int4_kernel(), x, n, (weight, scales_and_zeros), (group_size,))


@torch.library.custom_op("llamarun::int8_mm_cuda", mutates_args=())
def int8_mm_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8_mm as an operator that torch.compile keeps whole (inductor calls it, opaque)."""
    return int8_mm(x, weight, scales)


@int8_mm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("llamarun::int4_mm_cuda", mutates_args=())
def int4_mm_op(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """int4_mm as an operator, as int8_mm_op."""
    return int4_mm(x, weight, scales_and_zeros, group_size)


@int4_mm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
      group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _on_rows(x: torch.Tensor, n: int, op, direct, *args) -> torch.Tensor:  # noqa: ANN001
    """x (..., K) as rows (M, K) through op (under torch.compile: the operator) or direct (a
    launch), the result back as (..., n)."""
    rows = x.reshape(-1, x.shape[-1])
    y = (op if torch.compiler.is_compiling() else direct)(rows, *args)
    return y.reshape(*x.shape[:-1], n)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (weight * scales[:, None]).T for at most MAX_ROWS rows of x (under
    torch.compile through the operator, else by a direct launch)."""
    return _on_rows(x, weight.shape[0], torch.ops.llamarun.int8_mm_cuda, int8_mm, weight, scales)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (..., K) @ W.T (int4_mm's W) for at most MAX_ROWS rows of x, as int8_linear."""
    return _on_rows(x, weight.shape[0], torch.ops.llamarun.int4_mm_cuda, int4_mm, weight,
                    scales_and_zeros, group_size)
