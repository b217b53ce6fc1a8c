"""llamarun.kernels: each kernel against float64 and PyTorch's kernels, row invariance, the
fallback (LLAMARUN_KERNELS=0, a failed build) and tracing by torch.compile."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from llamarun import kernels
from llamarun.device import linear
from llamarun.errors import InvalidArgumentError
from llamarun.quant import Int8Linear, quantize_int8

needs_bf16 = pytest.mark.skipif(not kernels.bf16_available(),
                                reason="no AVX512-BF16 kernel on this machine")
needs_int8 = pytest.mark.skipif(not kernels.int8_available(),
                                reason="no AVX512-VNNI kernel on this machine")

SHAPES = [(1, 1, 1), (1, 31, 5), (3, 33, 13), (8, 64, 64), (5, 77, 29), (2, 300, 7),
          (7, 129, 130), (4, 1000, 33)]  # (M, K, N): odd K and N, tails of every length


def _bf16_data(m: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16())


def _int8_data(m: int, k: int, n: int, dtype: torch.dtype,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, ::17] *= 20  # outlier channels, as in real activations
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return x.to(dtype), q, torch.rand(n, generator=g) / 100


@needs_bf16
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16_kernel_matches_float64(m: int, k: int, n: int) -> None:
    x, w = _bf16_data(m, k, n)
    y = kernels.dense_linear(x, w)
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = x.double() @ w.double().t()
    # float32 accumulation, then one rounding to bfloat16 (8 bits)
    bound = 2.0**-8 * ref.abs() + 1e-6 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()
    assert torch.allclose(y.float(), F.linear(x, w).float(), rtol=2**-7, atol=1e-2)


def _int8_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The largest error blockwise int8 activations allow: half a step per value, times |w|."""
    xd = x.double()
    k = xd.shape[1]
    pad = -k % 64
    amax = F.pad(xd.abs(), (0, pad)).view(xd.shape[0], -1, 64).amax(-1)  # (M, K / 64)
    step = (amax / 127).repeat_interleave(64, dim=1)[:, :k]  # (M, K)
    return (step / 2) @ (q.double().abs() * s.double()[:, None]).t()


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_kernel_matches_float64(m: int, k: int, n: int, dtype: torch.dtype) -> None:
    x, q, s = _int8_data(m, k, n, dtype)
    y = kernels.int8_linear(x, q, s)
    assert y is not None and y.dtype == dtype and y.shape == (m, n)
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    out_rounding = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    bound = _int8_bound(x, q, s) * 1.001 + out_rounding * ref.abs() + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


@needs_int8
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int8_kernel_is_as_close_as_pytorchs(m: int) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 512, generator=g)
    x = torch.randn(m, 512, generator=g).bfloat16()
    parts = quantize_int8(w)
    ref = x.double() @ (parts.q.double() * parts.scale.double()[:, None]).t()
    ours = kernels.int8_linear(x, parts.q, parts.scale)
    theirs = torch.ops.aten._weight_int8pack_mm(x, parts.q, parts.scale.bfloat16())
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert ours is not None and err(ours) < 1e-2 and err(theirs) < 1e-2


@needs_bf16
@needs_int8
@pytest.mark.parametrize("k,n", [(77, 29), (256, 130)])
def test_rows_do_not_depend_on_the_batch(k: int, n: int) -> None:
    x, w = _bf16_data(8, k, n, seed=2)
    xi, q, s = _int8_data(8, k, n, torch.float32, seed=2)
    module = Int8Linear(k, n, kernel=True)
    module.load_state_dict({"weight": q, "scales": s}, assign=True)
    products = [lambda a: linear(a, w), lambda a: kernels.int8_linear(a, q, s)]
    for product, inputs in zip(products + [module], [x, xi, xi]):
        alone = [product(inputs[i:i + 1]) for i in range(8)]
        for m in range(1, 9):
            batch = product(inputs[:m])
            for i in range(m):
                assert torch.equal(batch[i], alone[i][0]), (m, i)


def test_fallback_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = _bf16_data(2, 40, 9)
    xi, q, s = _int8_data(2, 64, 9, torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.bf16_available() and not kernels.int8_available()
    assert kernels.dense_linear(x, w) is None and kernels.int8_linear(xi, q, s) is None
    assert torch.equal(linear(x, w), F.linear(x, w))
    module = Int8Linear(64, 9, kernel=True)
    module.load_state_dict({"weight": q, "scales": s.bfloat16()}, assign=True)
    assert torch.equal(module(xi), torch.ops.aten._weight_int8pack_mm(xi, q, s.bfloat16()))
    monkeypatch.setenv(kernels.ENV, "yes")
    with pytest.raises(InvalidArgumentError, match="LLAMARUN_KERNELS"):
        linear(x, w)


def test_selector_leaves_other_products_to_pytorch() -> None:
    x, w = _bf16_data(kernels.MAX_ROWS + 1, 40, 9)
    assert kernels.dense_linear(x, w) is None  # a prefill-sized product
    assert not kernels.serves_dense(x, w)
    assert kernels.serves_dense(x[:1], w) == kernels.bf16_available()
    assert kernels.dense_linear(x[:1].float(), w.float()) is None  # float32: oneDNN
    assert kernels.dense_linear(x[:1].half(), w.half()) is None
    assert kernels.int8_linear(x[:1].half(), torch.zeros(9, 40, dtype=torch.int8),
                               torch.ones(9)) is None


def test_failed_build_falls_back_with_one_log_line(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error building extension 'llamarun_kernels'\nmore detail")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    kernels._extension.cache_clear()
    kernels._features.cache_clear()
    kernels.log.addHandler(caplog.handler)  # the CLI's tests may stop propagation to the root
    try:
        with caplog.at_level(logging.WARNING, logger="llamarun.kernels"):
            assert not kernels.bf16_available() and not kernels.int8_available()
        x, w = _bf16_data(1, 40, 9)
        assert torch.equal(linear(x, w), F.linear(x, w))
        lines = {r.getMessage() for r in caplog.records}  # once, whichever handler saw it
        assert lines == {"llamarun kernels unavailable, using PyTorch's "
                         "(Error building extension 'llamarun_kernels')"}
    finally:
        kernels.log.removeHandler(caplog.handler)
        kernels._extension.cache_clear()
        kernels._features.cache_clear()


@needs_bf16
@needs_int8
@pytest.mark.parametrize("cpp_wrapper", [False, True], ids=["python", "cpp_wrapper"])
def test_compiled_calls_trace_through_the_kernels(cpp_wrapper: bool) -> None:
    torch._dynamo.reset()
    x, w = _bf16_data(3, 96, 40, seed=4)
    xi, q, s = _int8_data(3, 96, 40, torch.bfloat16, seed=4)

    def step(x: torch.Tensor, xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear(x, w) * 2, kernels.int8_linear(xi, q, s) + 1

    compiled = torch.compile(step, fullgraph=True, options={"cpp_wrapper": cpp_wrapper})
    for a, b in zip(compiled(x, xi), step(x, xi)):
        assert torch.equal(a, b)
