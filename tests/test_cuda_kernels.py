"""The CUDA int8 and 4-bit kernels (quant.cuda_kernels) on CPU, under Triton's interpreter: their
indexing, masks, block sizes and dtypes against float64, and where Int8Linear and Int4Linear
hand them their products. The same checks on a GPU are in test_cuda.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import llamarun.device as device_mod
from llamarun.quant import (
    Int4Linear, Int8Linear, cuda_kernels, dequantize_int4, dequantize_int8, quantize_int4,
    quantize_int8,
)
from llamarun.quant.modules import int4_kernel, int4_layout, int8_kernel

CUDA = torch.device("cuda")


@pytest.fixture
def interpreted():
    """Triton's interpreter (conftest.py chooses it on machines without a GPU; where one is
    present, test_cuda.py runs the kernel itself); skipped where Triton is not installed."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present: see test_cuda.py)")


def _reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x.double() @ q.double().t()) * s.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3),
                                       (torch.float16, 1e-3)], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("rows,n,k", [(1, 100, 200), (2, 9, 2048), (3, 40, 1000), (5, 33, 7),
                                      (8, 64, 576), (16, 17, 96)])
def test_kernel_matches_float64(interpreted, rows, n, k, dtype, tol):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).to(dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, generator=g) / 50).to(dtype)
    y = cuda_kernels.int8_mm(x, q, s)
    assert y.shape == (rows, n) and y.dtype == dtype
    ref = _reference(x, q, s)
    # float32 sums of exact products; the result rounded once to the output dtype
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_kernel_reads_strided_rows_and_keeps_the_inputs(interpreted):
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(3, 2 * 160, generator=g)
    x = wide[:, ::2]  # not contiguous
    q = torch.randint(-127, 128, (24, 160), dtype=torch.int8, generator=g)
    s = torch.rand(24, generator=g)
    before = (x.clone(), q.clone(), s.clone())
    y = cuda_kernels.int8_mm(x, q, s)
    assert torch.allclose(y.double(), _reference(x, q, s), rtol=1e-5, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip((x, q, s), before))


def test_blocks_pad_the_rows_and_keep_the_work_per_program():
    assert cuda_kernels.blocks(1) == (1, 512)
    assert cuda_kernels.blocks(3) == (4, 128)
    assert cuda_kernels.blocks(16) == (16, 32)
    for rows in range(1, cuda_kernels.MAX_ROWS + 1):
        block_m, block_k = cuda_kernels.blocks(rows)
        assert block_m >= rows and block_m * cuda_kernels.BLOCK_N * block_k == cuda_kernels.ELEMENTS
    for rows in (0, cuda_kernels.MAX_ROWS + 1):
        with pytest.raises(ValueError, match="1 to 16 rows"):
            cuda_kernels.blocks(rows)


def test_mismatched_operands_raise():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="do not fit"):
        cuda_kernels.int8_mm(x, torch.zeros(8, 32, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="do not fit"):
        cuda_kernels.int8_mm(x, torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8))
    with pytest.raises(ValueError, match="do not fit"):
        cuda_kernels.int8_mm(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(9))


def test_the_operator_agrees_with_its_fake(interpreted):
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, 96, generator=g).bfloat16(),
            torch.randint(-127, 128, (24, 96), dtype=torch.int8, generator=g),
            torch.rand(24, generator=g).bfloat16())
    torch.library.opcheck(torch.ops.llamarun.int8_mm_cuda, args,
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(torch.ops.llamarun.int8_mm_cuda(*args), cuda_kernels.int8_mm(*args))


def _hands_decode_rows_to(module: torch.nn.Module, kernel: str, ref_w: torch.Tensor,
                          shapes: list[tuple[int, int]], monkeypatch) -> None:
    """module(x) for x of each (batch, tokens) shape: up to 16 rows through cuda_kernels.<kernel>
    in one launch, more through the dequantized product; each close to x @ ref_w.T."""
    calls = []
    real = getattr(cuda_kernels, kernel)
    monkeypatch.setattr(cuda_kernels, kernel, lambda *a: calls.append(a[0].shape) or real(*a))
    g = torch.Generator().manual_seed(5)
    n, k = ref_w.shape
    for shape in shapes:
        calls.clear()
        x = torch.randn(*shape, k, generator=g).bfloat16()
        y = module(x)
        rows = shape[0] * shape[1]
        assert y.shape == (*shape, n) and y.dtype == torch.bfloat16
        assert calls == ([(rows, k)] if rows <= 16 else [])
        ref = x.double() @ ref_w.double().t()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_int8_linear_hands_decode_rows_to_the_kernel(interpreted, monkeypatch):
    parts = quantize_int8(torch.randn(48, 160, generator=torch.Generator().manual_seed(5)))
    module = Int8Linear(160, 48, kernel="cuda")
    module.load_state_dict(Int8Linear.state(parts, device=torch.device("cpu"),
                                            dtype=torch.bfloat16, kernel="cuda"), assign=True)
    _hands_decode_rows_to(module, "int8_mm", dequantize_int8(parts),
                          [(1, 1), (2, 3), (1, 16), (2, 20)], monkeypatch)


def test_the_kernel_is_chosen_for_cuda_devices_with_triton(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    have = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "triton" else have(name, *a))
    assert device_mod.cuda_triton_kernels(CUDA) and int8_kernel(CUDA, 100) == "cuda"
    assert int8_kernel(torch.device("cpu"), 256) == "cpu"  # the CPU kernels stay the CPU's
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert not device_mod.cuda_triton_kernels(CUDA) and int8_kernel(CUDA, 100) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else have(name, *a))
    assert int8_kernel(CUDA, 100) is None  # no Triton: the dequantized product


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3),
                                       (torch.float16, 1e-3)], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("rows,n,k,group", [(1, 40, 256, 32), (2, 9, 2048, 64), (3, 17, 192, 64),
                                            (8, 64, 576, 32), (16, 5, 128, 128)])
def test_int4_kernel_matches_float64(interpreted, rows, n, k, group, dtype, tol):
    g = torch.Generator().manual_seed(rows * 1000 + n + k + group)
    parts = quantize_int4(torch.randn(n, k, generator=g), group)
    state = Int4Linear.state(parts, device=torch.device("cpu"), dtype=dtype, layout="plain")
    x = torch.randn(rows, k, generator=g).to(dtype)
    y = cuda_kernels.int4_mm(x, state["weight"], state["scales_and_zeros"], group)
    assert y.shape == (rows, n) and y.dtype == dtype
    # the reference from the same stored scales and zeros (the plain layout keeps them in dtype)
    sz = state["scales_and_zeros"].double()
    q = dequantize_int4(parts).double()  # the weight as quantized, in float
    nibbles = torch.stack([state["weight"] & 15, state["weight"] >> 4], dim=-1).view(n, k).double()
    w = ((nibbles - 8).view(n, k // group, group) * sz[:, :, 0].t()[..., None]
         + sz[:, :, 1].t()[..., None]).view(n, k)
    assert ((w - q).abs().max() / q.abs().max()).item() < 1e-2  # the layout holds the weight
    ref = x.double() @ w.t()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_int4_mismatched_operands_raise():
    x = torch.randn(2, 64)
    w, sz = torch.zeros(8, 32, dtype=torch.uint8), torch.ones(2, 8, 2)
    with pytest.raises(ValueError, match="do not fit"):
        cuda_kernels.int4_mm(x, w.to(torch.int8), sz, 32)
    with pytest.raises(ValueError, match="do not fit"):
        cuda_kernels.int4_mm(x, w, sz, 64)  # one group of 64, not two
    with pytest.raises(ValueError, match="do not fit"):
        cuda_kernels.int4_mm(x[:, :62], w[:, :31], torch.ones(2, 8, 2), 31)


def test_the_int4_operator_agrees_with_its_fake(interpreted):
    parts = quantize_int4(torch.randn(24, 96, generator=torch.Generator().manual_seed(2)), 32)
    state = Int4Linear.state(parts, device=torch.device("cpu"), dtype=torch.bfloat16,
                             layout="plain")
    args = (torch.randn(3, 96).bfloat16(), state["weight"], state["scales_and_zeros"], 32)
    torch.library.opcheck(torch.ops.llamarun.int4_mm_cuda, args,
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(torch.ops.llamarun.int4_mm_cuda(*args), cuda_kernels.int4_mm(*args))


def test_int4_linear_hands_plain_decode_rows_to_the_kernel(interpreted, monkeypatch):
    parts = quantize_int4(torch.randn(36, 256, generator=torch.Generator().manual_seed(6)), 64)
    module = Int4Linear(256, 36, group_size=64, layout="plain", kernel="cuda")
    module.load_state_dict(Int4Linear.state(parts, device=torch.device("cpu"),
                                            dtype=torch.bfloat16, layout="plain"), assign=True)
    _hands_decode_rows_to(module, "int4_mm", dequantize_int4(parts), [(1, 1), (4, 4), (1, 17)],
                          monkeypatch)


def test_the_int4_kernel_is_chosen_for_plain_weights_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    have = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "triton" else have(name, *a))
    # a T4 (7.5): no tensor-core 4-bit kernel, so the plain layout, through the Triton kernel
    assert int4_layout(CUDA, 256, 36, 32) == "plain"
    assert int4_kernel(CUDA, "plain") == "cuda"
    assert int4_kernel(CUDA, "tinygemm") is None and int4_kernel(torch.device("cpu"), "plain") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert int4_kernel(CUDA, "plain") is None
