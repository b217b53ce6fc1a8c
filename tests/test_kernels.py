"""llamarun.kernels: each kernel against float64 and PyTorch's kernels, row invariance, the
fallback (LLAMARUN_KERNELS=0, a failed build) and tracing by torch.compile."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llamarun import kernels, sampling
from llamarun.device import linear
from llamarun.errors import InvalidArgumentError
from llamarun.model import RMSNorm
from llamarun.rope import apply_rope, rope_cache
from llamarun.quant import Int4Linear, Int8Linear, int4_layout, quantize_int4, quantize_int8

needs_bf16 = pytest.mark.skipif(not kernels.bf16_available(),
                                reason="no AVX512-BF16 kernel on this machine")
needs_int8 = pytest.mark.skipif(not kernels.int8_available(),
                                reason="no int8 kernel (AVX512-VNNI, or AVX2 without AVX-512) here")
needs_int4 = pytest.mark.skipif(not kernels.int4_available(),
                                reason="no 4-bit kernel (AVX2 or AVX-512) on this machine")
needs_f32 = pytest.mark.skipif(not kernels.f32_available(),
                               reason="no float32 kernel (AVX2 or AVX-512) on this machine")
needs_avx2_int8 = pytest.mark.skipif(not (kernels.int8_available() and not kernels._features()[1]),
                                     reason="no AVX2 int8 kernel (AVX2 without AVX-512) here")
needs_attend = pytest.mark.skipif(not kernels.attend_available(),
                                  reason="no attention kernel (AVX2 and FMA) on this machine")

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


@needs_f32
@pytest.mark.parametrize("m,k,n", SHAPES + [(70, 96, 27), (513, 40, 50)])
def test_f32_kernel_matches_float64(m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    x[:, ::17] *= 20
    y = linear(x, w)  # the selector's choice: the kernel
    assert kernels.serves_dense(x, w) and y.dtype == torch.float32 and y.shape == (m, n)
    assert torch.equal(y, kernels.dense_linear(x, w))
    ref = x.double() @ w.double().t()
    # float32 sums of k products: at most about k ulps of the sum of magnitudes
    bound = (k + 8) * 2.0**-24 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()


@needs_f32
@pytest.mark.parametrize("k,n", [(7, 5), (77, 29), (576, 130), (1537, 200)])
def test_f32_rows_do_not_depend_on_the_pass(k: int, n: int) -> None:
    """Each row as computed alone, bit for bit, in passes of 1-9 rows (every split into
    passes of at most 4) and of 70 and 300 (activation tiles of 64; K past 1024 in ranges)."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(300, k, generator=g), torch.randn(n, k, generator=g)
    alone = torch.stack([linear(x[i:i + 1], w)[0] for i in range(300)])
    for m in [*range(1, 10), 70, 300]:
        assert torch.equal(linear(x[:m], w), alone[:m]), m
    assert torch.equal(linear(x[5:75], w), alone[5:75])  # other rows, other places in the tiles


@needs_f32
def test_compiled_one_row_step_runs_the_f32_kernel() -> None:
    """A compiled one-token product is the kernel's (not inductor's multiply + sum, which
    rounds otherwise), so compiled and eager rows are the same bit for bit."""
    from llamarun.model import Linear

    torch._dynamo.reset()
    layer = Linear(96, 40)
    x = torch.randn(1, 96)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x)
        assert torch.equal(compiled, layer(x))
        assert torch.equal(compiled, linear(torch.cat([x, x, x]), layer.weight)[:1])


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


@needs_int8
def test_int8_rows_do_not_depend_on_the_batch_up_to_its_limit() -> None:
    # Up to int8_max_rows() rows (32 with VNNI: 8 decode rows' logits beside a prompt chunk's
    # last) each row is the same as alone; past it the product is PyTorch's (None here).
    limit = kernels.int8_max_rows()
    m = min(limit, 40)
    xi, q, s = _int8_data(m + 1, 200, 37, torch.bfloat16, seed=9)
    alone = [kernels.int8_linear(xi[i:i + 1], q, s)[0] for i in range(m)]
    for rows in sorted({9, 17, m}):
        batch = kernels.int8_linear(xi[:rows], q, s)
        assert all(torch.equal(batch[i], alone[i]) for i in range(rows)), rows
    if limit < m + 1:
        assert kernels.int8_linear(xi, q, s) is None


@needs_bf16
@pytest.mark.parametrize("m", [1, 3])
def test_bf16_products_of_8_mb_and_more_give_the_same_outputs(m: int) -> None:
    """From 8 MB of weights on the threads split the rows by pieces_for, not in halves: each
    output is the same as from a smaller product over its rows."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 2048, generator=g).bfloat16()
    w = torch.randn(2052, 2048, generator=g).bfloat16()  # 8.4 MB, N not a multiple of 8
    whole = kernels.dense_linear(x, w)
    halves = [kernels.dense_linear(x, w[r]) for r in (slice(0, 1024), slice(1024, None))]
    assert whole is not None and torch.equal(whole, torch.cat(halves, dim=1))


@needs_int8
@pytest.mark.parametrize("m", [1, 3])
def test_int8_products_of_8_mb_and_more_give_the_same_outputs(m: int) -> None:
    """From 8 MB of weights on the threads split the rows by pieces_for, not in halves: each
    output is the same as from a smaller product over its rows (float64 checked above)."""
    x, q, s = _int8_data(m, 2048, 4100, torch.bfloat16, seed=4)  # 8.4 MB, N not a multiple of 8
    whole = kernels.int8_linear(x, q, s)
    halves = [kernels.int8_linear(x, q[r], s[r]) for r in (slice(0, 2048), slice(2048, None))]
    assert whole is not None and torch.equal(whole, torch.cat(halves, dim=1))


@needs_bf16
@needs_int8
@pytest.mark.parametrize("k,n", [(77, 29), (256, 130)])
def test_rows_do_not_depend_on_the_batch(k: int, n: int) -> None:
    x, w = _bf16_data(8, k, n, seed=2)
    xi, q, s = _int8_data(8, k, n, torch.float32, seed=2)
    module = Int8Linear(k, n, kernel="cpu")
    module.load_state_dict({"weight": q, "scales": s}, assign=True)
    products = [lambda a: linear(a, w), lambda a: kernels.int8_linear(a, q, s)]
    for product, inputs in zip(products + [module], [x, xi, xi]):
        alone = [product(inputs[i:i + 1]) for i in range(8)]
        for m in range(1, 9):
            batch = product(inputs[:m])
            for i in range(m):
                assert torch.equal(batch[i], alone[i][0]), (m, i)


ONE_ROW_SHAPES = [(31, 5), (77, 29), (128, 9), (333, 17), (2048 + 96, 24)]


@needs_bf16
@needs_int8
@pytest.mark.parametrize("k,n", ONE_ROW_SHAPES)
def test_one_row_orders_give_the_same_bits(k: int, n: int) -> None:
    # A one-row pass takes the weight rows one at a time on AMD CPUs and 8 at once elsewhere
    # (kernels.h's ROW_STREAM): either order, a row's bits are those of the blocks 2-8 rows
    # take, so a row's result does not depend on the CPU's order or its batch.
    ext = kernels._extension()
    x, w = _bf16_data(5, k, n, seed=4)
    xi, q, s = _int8_data(5, k, n, torch.bfloat16, seed=4)
    for i in range(5):
        row = ext.bf16_linear_by(x[i:i + 1], w, "rows")
        assert torch.equal(row, ext.bf16_linear_by(x[i:i + 1], w, "blocks"))
        assert torch.equal(row[0], ext.bf16_linear(x, w)[i])
        row = ext.int8_linear_by(xi[i:i + 1], q, s, "rows")
        assert torch.equal(row, ext.int8_linear_by(xi[i:i + 1], q, s, "blocks"))
        assert torch.equal(row[0], ext.int8_linear(xi, q, s)[i])
    with pytest.raises(RuntimeError, match="order rows or blocks"):
        ext.bf16_linear_by(x[:1], w, "columns")


@needs_f32
@pytest.mark.parametrize("k,n", ONE_ROW_SHAPES + [(16, 25), (65, 12)])
def test_f32_one_row_orders_give_the_same_bits(k: int, n: int) -> None:
    ext = kernels._extension()
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(5, k, generator=g), torch.randn(n, k, generator=g)
    for i in range(5):
        row = ext.f32_linear_by(x[i:i + 1], w, "rows")
        assert torch.equal(row, ext.f32_linear_by(x[i:i + 1], w, "blocks"))
        assert torch.equal(row[0], ext.f32_linear(x, w)[i])
    with pytest.raises(RuntimeError, match="order rows or blocks"):
        ext.f32_linear_by(x[:1], w, "diagonal")


def _int4_data(m: int, k: int, n: int, group: int, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (m, k) with outlier channels, q (n, k) in 0..15, float16 scales and zeros (n, k / g)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, ::17] *= 20
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, generator=g) / 50).half()
    zeros = (torch.randn(n, k // group, generator=g) / 20).half()
    return x.to(dtype), q, scales, zeros


def _int4_product(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """x -> kernels.int4_linear(x, ...) on q, scales and zeros (n, ...), packed once into its
    layouts."""
    n, k = q.shape
    w = kernels.int4_pack(q)
    d, z = kernels.int4_pack_groups(scales, k), kernels.int4_pack_groups(zeros, k)
    return lambda x: kernels.int4_linear(x, w, d, z, group, n)


def _int4_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    group = k // scales.shape[1]
    w = (q.double() - 8).view(n, -1, group) * scales.double()[..., None]
    return (w + zeros.double()[..., None]).view(n, k)


@needs_int4
@pytest.mark.parametrize("m", [1, 3])
def test_int4_products_of_8_mb_and_more_give_the_same_outputs(m: int) -> None:
    """From 8 MB of weights on the threads split the tiles by pieces_for (claims of 256 KB and
    more), not in halves: each output is the same as from a smaller product over its rows."""
    x, q, scales, zeros = _int4_data(m, 2048, 8200, 32, torch.bfloat16, seed=5)  # 8.4 MB
    whole = _int4_product(q, scales, zeros, 32)(x)
    halves = [_int4_product(q[r], scales[r], zeros[r], 32)(x)
              for r in (slice(0, 4096), slice(4096, None))]
    assert whole is not None and torch.equal(whole, torch.cat(halves, dim=1))


@pytest.mark.parametrize("n", [5, 13])
@pytest.mark.parametrize("k", [1, 31, 32, 64, 96, 333])
def test_int4_layout_round_trip(n: int, k: int) -> None:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = kernels.int4_pack(q)
    rows = -(-n // 16) * 16  # tiles of 16 rows, zero rows after the last
    assert packed.shape == (rows, -(-k // 64) * 32)
    unpacked = kernels.int4_unpack(packed, k)
    assert torch.equal(unpacked[:n], q) and not unpacked[n:].any()


def test_int4_layout_places_each_value_as_documented() -> None:
    # row 29 = tile 1, row 13 of it; column 64 + 32 + 4 * 5 + 2: pair 1, high nibble, vector
    # v = 5, byte j = 2 -> byte 512 * 1 + 64 * 5 + 4 * 13 + 2 of tile 1
    q = torch.zeros(32, 128, dtype=torch.uint8)
    q[29, 64 + 32 + 20 + 2] = 11
    q[2, 7] = 7  # tile 0, row 2, pair 0, low nibble, v 1, j 3 -> byte 64 * 1 + 4 * 2 + 3
    flat = kernels.int4_pack(q).view(2, -1)  # per tile
    assert flat[1, 512 + 64 * 5 + 4 * 13 + 2] == 11 << 4 and flat[0, 64 + 8 + 3] == 7
    assert flat.count_nonzero() == 2


# (the groups of K padded to a multiple of 64: 64 / 32 = 2, 128 / 32 = 4, 256 / 64, 384 / 128)
@pytest.mark.parametrize("n,k,group,padded", [(5, 32, 32, 2), (13, 96, 32, 4), (16, 256, 64, 4),
                                              (9, 384, 128, 3)])
def test_int4_groups_layout_round_trip(n: int, k: int, group: int, padded: int) -> None:
    t = torch.randn(n, k // group, generator=torch.Generator().manual_seed(n)).half()
    packed = kernels.int4_pack_groups(t, k)
    assert packed.shape == (-(-n // 16), padded, 16)
    assert packed.dtype == torch.float16 and packed.count_nonzero() == t.count_nonzero()
    assert torch.equal(kernels.int4_unpack_groups(packed, n, k // group), t)


def test_int4_groups_layout_places_each_value_as_documented() -> None:
    # row 29 = tile 1, row 13 of it, in lane 13; K = 96 has a zero group 3 past the last (the
    # kernel's last 64-value pair ends past K)
    t = torch.zeros(32, 3, dtype=torch.float16)
    t[29, 2] = 1.5
    t[2, 0] = 2.0  # tile 0, group 0, lane 2
    packed = kernels.int4_pack_groups(t, 96)
    assert packed.shape == (2, 4, 16)
    assert packed[1, 2, 13] == 1.5 and packed[0, 0, 2] == 2.0 and packed.count_nonzero() == 2


needs_int4_vnni = pytest.mark.skipif(not (kernels.int4_available() and kernels._features()[1]),
                                     reason="no AVX512-VNNI 4-bit tiles on this machine")


@needs_int4_vnni
@pytest.mark.parametrize("m,k,n,group", [(1, 32, 1, 32), (1, 96, 5, 32), (3, 160, 13, 32),
                                         (8, 576, 64, 64), (5, 384, 29, 128), (2, 2048, 130, 32),
                                         (7, 256, 33, 64), (4, 2048, 7, 128)])
def test_int4_vnni_tiles_give_the_avx2_tiles_bits(m: int, k: int, n: int, group: int) -> None:
    # The same int32 block sums, then the same float multiply-adds in the same order.
    for dtype in (torch.float32, torch.bfloat16):
        x, q, scales, zeros = _int4_data(m, k, n, group, dtype)
        w, d = kernels.int4_pack(q), kernels.int4_pack_groups(scales, k)
        z = kernels.int4_pack_groups(zeros, k)
        ext = kernels._extension()
        assert torch.equal(ext.int4_linear_by(x, w, d, z, group, n, "vnni"),
                           ext.int4_linear_by(x, w, d, z, group, n, "avx2"))


needs_int4_amx = pytest.mark.skipif(kernels.int4_amx_rows() is None,
                                    reason="no AMX tiles for the 4-bit kernel on this machine")


@needs_int4_amx
@pytest.mark.parametrize("m,k,n,group", [(1, 32, 1, 32), (5, 96, 5, 32), (16, 160, 13, 32),
                                         (17, 576, 64, 64), (40, 384, 29, 128),
                                         (64, 2048, 130, 32), (100, 256, 33, 64),
                                         (33, 2048, 7, 128)])
def test_int4_amx_tiles_give_the_vnni_tiles_bits(m: int, k: int, n: int, group: int) -> None:
    # The same exact int32 block sums (tdpbssd on q - 8 against vpdpbusd on q, less 8 sum(a)),
    # then the same float multiply-adds in the same block order, with zeros and without.
    ext = kernels._extension()
    for dtype in (torch.float32, torch.bfloat16):
        x, q, scales, zeros = _int4_data(m, k, n, group, dtype, seed=m + n)
        w, d = kernels.int4_pack(q), kernels.int4_pack_groups(scales, k)
        for z in (kernels.int4_pack_groups(zeros, k), torch.empty(0, dtype=torch.float16)):
            amx = ext.int4_linear_by(x, w, d, z, group, n, "amx")
            assert amx.dtype == dtype and amx.shape == (m, n)
            assert torch.equal(amx, ext.int4_linear_by(x, w, d, z, group, n, "vnni"))


@needs_int4_amx
def test_int4_kernel_takes_amx_from_its_row_count_on_and_rows_stay_their_own() -> None:
    # int4_linear picks the AMX tiles from int4_amx_rows() rows on: a row's numbers are the same
    # in a pass of 1 row as in passes of 15, 16, 127 or 300 (the module's GEMM takes bfloat16
    # passes from kernels.INT4_GEMM_ROWS on; the kernel itself serves them too).
    k, n, group = 256, 40, 32
    x, q, scales, zeros = _int4_data(300, k, n, group, torch.bfloat16, seed=4)
    product = _int4_product(q, scales, zeros, group)
    rows = kernels.int4_amx_rows()
    alone = product(x[7:8])
    for m in (rows - 1, rows, kernels.INT4_GEMM_ROWS - 1, 300):
        assert torch.equal(product(x[:m])[7], alone[0])
    with pytest.raises(RuntimeError, match="code avx2, vnni or amx"):
        w, d = kernels.int4_pack(q), kernels.int4_pack_groups(scales, k)
        kernels._extension().int4_linear_by(x, w, d, torch.empty(0, dtype=torch.float16),
                                            group, n, "tiles")


@needs_int4
@pytest.mark.parametrize("m,k,n,group", [(1, 96, 5, 32), (5, 384, 29, 128), (8, 576, 64, 64)])
def test_int4_kernel_without_zeros_equals_zeros_of_0(m: int, k: int, n: int, group: int) -> None:
    # A symmetric weight passes no zeros (an empty tensor): nothing of them is read, and the
    # product and the dequantized weight are those of zeros that are all 0.
    x, q, scales, _ = _int4_data(m, k, n, group, torch.bfloat16)
    w, d = kernels.int4_pack(q), kernels.int4_pack_groups(scales, k)
    zero = kernels.int4_pack_groups(torch.zeros_like(scales), k)
    none = torch.empty(0, dtype=torch.float16)
    assert torch.equal(kernels.int4_linear(x, w, d, none, group, n),
                       kernels.int4_linear(x, w, d, zero, group, n))
    assert torch.equal(kernels._extension().int4_dequant(w, d, none, group, n, k,
                                                         torch.empty(n, k, dtype=torch.bfloat16)),
                       kernels._extension().int4_dequant(w, d, zero, group, n, k,
                                                         torch.empty(n, k, dtype=torch.bfloat16)))


@needs_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n,group", [(1, 32, 1, 32), (1, 96, 5, 32), (3, 160, 13, 32),
                                         (8, 576, 64, 64), (5, 384, 29, 128), (2, 1024, 130, 32),
                                         (7, 256, 33, 64), (4, 2048, 7, 128)])
def test_int4_kernel_matches_float64(m: int, k: int, n: int, group: int,
                                     dtype: torch.dtype) -> None:
    x, q, scales, zeros = _int4_data(m, k, n, group, dtype)
    y = _int4_product(q, scales, zeros, group)(x)
    assert y is not None and y.dtype == dtype and y.shape == (m, n)
    w = _int4_weight(q, scales, zeros)
    ref = x.double() @ w.t()
    # activations in int8 blocks of 32: half a step per value, times the scaled nibble (the
    # zero points meet exact float sums)
    xd = x.double()
    step = (xd.abs().view(m, -1, 32).amax(-1) / 127).repeat_interleave(32, dim=1)
    nibbles = (q.double() - 8).abs().view(n, -1, group) * scales.double()[..., None]
    bound = (step / 2) @ nibbles.view(n, k).t()
    out_rounding = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    bound = bound * 1.001 + out_rounding * ref.abs() + 1e-5 * (xd.abs() @ w.abs().t()) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


@needs_int4
@pytest.mark.parametrize("group", [32, 128])
def test_int4_module_runs_the_kernel_and_dequantizes_past_it(group: int) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 256, generator=g)
    parts = quantize_int4(w, group)
    cpu = torch.device("cpu")
    assert int4_layout(cpu, 256, 96, group) == "llamarun"
    module = Int4Linear(256, 96, group_size=group, layout="llamarun")
    module.load_state_dict(Int4Linear.state(parts, device=cpu, dtype=torch.float32,
                                            layout="llamarun"), assign=True)
    dense = module.dense(torch.float32)
    ref_w = _int4_weight(parts.q, parts.scale.half(), parts.zero.half()).float()
    assert torch.equal(dense, ref_w)  # float16 scales and zeros, exact in float32
    limit = kernels.INT4_MAX_ROWS
    for rows in (1, 9, limit, limit + 1):  # the kernel (prefill chunks too), then F.linear
        x = torch.randn(rows, 256, generator=g)
        y = module(x)
        ref = x.double() @ ref_w.double().t()
        assert ((y.double() - ref).norm() / ref.norm()).item() < (1e-2 if rows <= limit else 1e-6)
        if rows <= limit:  # each row as the kernel computes it alone, bit for bit
            assert torch.equal(y[-1], module(x[-1:])[0])


@needs_int4
@pytest.mark.parametrize("n,k,group", [(13, 96, 32), (40, 256, 128), (8, 64, 64)])
def test_int4_dequant_gives_the_weight_in_bfloat16(n: int, k: int, group: int) -> None:
    _, q, scales, zeros = _int4_data(1, k, n, group, seed=n)
    scales, zeros = scales.half(), zeros.half()  # as the layout stores them
    d, z = kernels.int4_pack_groups(scales, k), kernels.int4_pack_groups(zeros, k)
    w = kernels.int4_dequant(kernels.int4_pack(q), d, z, group, n, k)
    assert w.shape == (n, k) and w.dtype == torch.bfloat16
    ref = _int4_weight(q, scales, zeros).float()  # exact: float16 parts, 4-bit values
    assert torch.equal(w, ref.bfloat16())  # rounded once, to nearest even


@needs_int4
@pytest.mark.parametrize("n,k", [(13, 100), (64, 256)])
def test_int8_dequant_gives_the_modules_dense_weight(n: int, k: int) -> None:
    _, q, s = _int8_data(1, k, n, torch.float32, seed=k)
    module = Int8Linear(k, n, kernel="cpu")
    module.load_state_dict({"weight": q, "scales": s.bfloat16()}, assign=True)
    w = kernels.int8_dequant(q, s.bfloat16())
    assert w is not None and torch.equal(w, module.dense(torch.bfloat16))  # 100: an 8-value tail
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    if kernels.int8_max_rows() < 40:  # (the AVX2 int8 kernel serves 40 rows itself)
        assert torch.equal(module(x), F.linear(x, module.dense(torch.bfloat16)))  # a GEMM


@needs_int4
@pytest.mark.skipif(not kernels._amx(), reason="the dequantized GEMM serves CPUs with AMX")
def test_int4_module_takes_the_bfloat16_gemm_for_prompt_sized_passes() -> None:
    g = torch.Generator().manual_seed(8)
    parts = quantize_int4(torch.randn(96, 256, generator=g), 32)
    cpu = torch.device("cpu")
    module = Int4Linear(256, 96, group_size=32, layout="llamarun")
    module.load_state_dict(Int4Linear.state(parts, device=cpu, dtype=torch.bfloat16,
                                            layout="llamarun"), assign=True)
    ref_w = module.dense(torch.float32).double()
    for rows in (kernels.INT4_GEMM_ROWS - 1, kernels.INT4_GEMM_ROWS, 300):
        x = torch.randn(rows, 256, generator=g).bfloat16()
        assert kernels.int4_gemm_serves(x, 96, 256) == (rows >= kernels.INT4_GEMM_ROWS)
        ref = x.double() @ ref_w.t()
        assert ((module(x).double() - ref).norm() / ref.norm()).item() < 1e-2


@needs_int4
@needs_int8
@pytest.mark.parametrize("k,n", [(96, 29), (512, 130)])
def test_avx2_rows_do_not_depend_on_the_batch(k: int, n: int) -> None:
    x, q4, scales, zeros = _int4_data(8, k, n, 32, seed=3)
    _, q8, s8 = _int8_data(8, k, n, torch.float32, seed=3)
    products = [_int4_product(q4, scales, zeros, 32),
                lambda a: kernels.int8_linear(a, q8, s8)]
    for product in products:
        alone = [product(x[i:i + 1]) for i in range(8)]
        for m in range(1, 9):
            batch = product(x[:m])
            for i in range(m):
                assert torch.equal(batch[i], alone[i][0]), (m, i)


@needs_avx2_int8
def test_avx2_int8_kernel_serves_prefill_sized_passes() -> None:
    """Past 8 rows (an output head under 8 decode rows and a prompt chunk, verification passes,
    perplexity) the AVX2 int8 kernel still computes each row as alone, through the module."""
    assert kernels.int8_max_rows() == kernels.INT8_AVX2_MAX_ROWS
    x, q, s = _int8_data(300, 96, 40, torch.float32, seed=6)
    module = Int8Linear(96, 40, kernel="cpu")
    module.load_state_dict({"weight": q, "scales": s.bfloat16()}, assign=True)
    for rows in (9, 64, 300):
        y = module(x[:rows])
        assert torch.equal(y[rows - 1], module(x[rows - 1:rows])[0]), rows
        sb = s.bfloat16().float()
        ref = x[:rows].double() @ (q.double() * sb.double()[:, None]).t()
        bound = _int8_bound(x[:rows], q, sb) * 1.001 + 1e-6 * ref.abs() + 1e-6
        assert ((y.double() - ref).abs() <= bound).all(), rows


@needs_int4
def test_int4_kernel_reads_nothing_past_its_scales() -> None:
    """K % 64 == 32 (a tensor-parallel shard's K = 32, or K = 96): the kernel's last 64-value
    pair ends in a block past K. It once read that block's scale past the end of its vector,
    0 * whatever the heap held there, and NaN at times. glibc's MALLOC_PERTURB_ fills freed
    memory with 0xFF bytes (a float NaN), which makes such a read show on every run."""
    script = """
import torch
from llamarun import kernels
torch.manual_seed(0)
bad = 0
for k in (32, 96, 160):
    for n in (8, 40):
        x = torch.randn(3, k)
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        scales, zeros = torch.rand(n, k // 32).half(), torch.rand(n, k // 32).half()
        for _ in range(10):
            y = kernels.int4_linear(x, kernels.int4_pack(q), kernels.int4_pack_groups(scales, k),
                                    kernels.int4_pack_groups(zeros, k), 32, n)
            bad += int(not torch.isfinite(y).all())
print(bad)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "MALLOC_PERTURB_": "255"},
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "0", "products with non-finite values: " + r.stdout


@needs_int4
def test_compiled_calls_trace_through_the_int4_kernel() -> None:
    torch._dynamo.reset()
    x, q, scales, zeros = _int4_data(3, 128, 40, 64, seed=6)
    packed = kernels.int4_pack(q)
    d, z = kernels.int4_pack_groups(scales, 128), kernels.int4_pack_groups(zeros, 128)

    def step(x: torch.Tensor) -> torch.Tensor:
        return kernels.int4_linear(x, packed, d, z, 64, 40) + 1

    # aot_eager: dynamo and AOTAutograd trace the op through its fake form and call it as a
    # graph node (inductor adds nothing to that, and its compile costs ~15 s here)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), step(x))


def test_constant_marks_are_torchs_own() -> None:
    # kernels._constant_result stands in for torch.compiler.assume_constant_result (which imports
    # torch._dynamo): both must leave a function marked the same way
    def theirs() -> bool:
        return True

    def ours() -> bool:
        return True

    torch.compiler.assume_constant_result(theirs)
    kernels._constant_result(ours)
    assert theirs.__dict__ == ours.__dict__ == {"_dynamo_marked_constant": True}
    assert kernels.bf16_available.__dict__ == ours.__dict__


def test_importing_the_cli_does_not_import_dynamo() -> None:
    # most commands never compile: torch._dynamo (and Triton, where installed) cost 0.75 s a start
    code = "import sys, llamarun.cli; print('torch._dynamo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_fallback_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = _bf16_data(2, 40, 9)
    xi, q, s = _int8_data(2, 64, 9, torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.bf16_available() and not kernels.int8_available()
    assert not kernels.int4_available() and not kernels.int4_layout(32)
    assert not kernels.attend_available() and not kernels.f32_available()
    assert kernels.dense_linear(x, w) is None and kernels.int8_linear(xi, q, s) is None
    assert kernels.dense_linear(x.float(), w.float()) is None
    assert torch.equal(linear(x, w), F.linear(x, w))
    module = Int8Linear(64, 9, kernel="cpu")
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
    # float32: the kernel on AVX2 and AVX-512 CPUs (every pass size up to F32_MAX_ROWS), else oneDNN
    assert kernels.serves_dense(x.float(), w.float()) == kernels.f32_available()
    big = torch.zeros(kernels.F32_MAX_ROWS + 1, 40)
    assert kernels.dense_linear(big, w.float()) is None
    assert kernels.dense_linear(x.float(), w) is None  # mixed dtypes
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
    kernels._attend_cpu.cache_clear()
    kernels.log.addHandler(caplog.handler)  # the CLI's tests may stop propagation to the root
    try:
        with caplog.at_level(logging.WARNING, logger="llamarun.kernels"):
            assert not kernels.bf16_available() and not kernels.int8_available()
            assert not kernels.attend_available()
        x, w = _bf16_data(1, 40, 9)
        assert torch.equal(linear(x, w), F.linear(x, w))
        lines = {r.getMessage() for r in caplog.records}  # once, whichever handler saw it
        assert lines == {"llamarun kernels unavailable, using PyTorch's "
                         "(Error building extension 'llamarun_kernels')"}
    finally:
        kernels.log.removeHandler(caplog.handler)
        kernels._extension.cache_clear()
        kernels._features.cache_clear()
        kernels._attend_cpu.cache_clear()


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


def test_the_kernels_build_wherever_they_serve() -> None:
    # A build error (a C++ mistake) would otherwise only turn the kernel tests into skips.
    if not (kernels.enabled() and kernels._serves_cpu()):
        pytest.skip("none of llamarun's kernels serves this CPU")
    assert kernels._extension() is not None


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path: Path) -> None:
    (tmp_path / "lock").touch()  # torch's lock file, as a build killed midway leaves it
    with kernels._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()  # else every later build waits forever


def test_build_pending_says_when_the_first_use_will_build(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path) -> None:
    class Unbuilt:
        @staticmethod
        def cache_info():  # noqa: ANN205
            return type("Info", (), {"currsize": 0})()

    monkeypatch.setattr(kernels, "_extension", Unbuilt)
    monkeypatch.setattr(kernels, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(kernels, "_serves_cpu", lambda: True)
    assert kernels.build_pending()
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.build_pending()
    monkeypatch.setenv(kernels.ENV, "1")
    (tmp_path / "llamarun_kernels.so").write_bytes(b"")
    assert not kernels.build_pending()
    (tmp_path / "llamarun_kernels.so").unlink()
    monkeypatch.setattr(kernels, "_serves_cpu", lambda: False)  # nothing of ours runs here
    assert not kernels.build_pending()


def _attend_data(tokens: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int,
                 rows: int = 4, positions: int = 1100,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    positions = max(positions, max(p for _, p in tokens) + 1)
    k = torch.randn(rows, kv_heads, positions, head_dim, generator=g)
    v = torch.randn(rows, kv_heads, positions, head_dim, generator=g)
    q = torch.randn(len(tokens), heads, head_dim, generator=g) * 3  # peaked softmaxes too
    r = torch.tensor([t[0] for t in tokens])
    p = torch.tensor([t[1] for t in tokens])
    return q, k, v, r, p


ATTEND_CASES = [  # (tokens as (row, position), heads, kv heads, head_dim)
    ([(0, 0)], 1, 1, 8),
    ([(1, 4), (1, 5), (3, 12), (3, 7), (2, 15)], 4, 4, 64),  # MHA; 5, 6, 13, 8, 16 keys: blocks of 8 and tails
    ([(2, 999), (0, 31), (0, 32), (0, 33)], 9, 3, 64),  # SmolLM2's grouping
    ([(3, 1099), (1, 70)], 8, 2, 128),  # Llama 3's head size: two passes of 64 values
    ([(0, 6)], 6, 2, 24),  # a head size not a multiple of 64
    # past CHUNK (1,024) keys: parts combined; alone, a decode row's parts go to their own items
    ([(1, 2599)], 9, 3, 64),
    ([(2, 1023), (0, 1024), (3, 2047), (1, 2048), (1, 3500)], 9, 3, 64),
    ([(0, 1500)], 8, 8, 64),  # MHA (its 8 heads keep 2 threads busy: no part gets its own item)
]


@pytest.fixture(params=[8, 16], ids=["lanes8", "lanes16"])
def attention_lanes(request: pytest.FixtureRequest) -> Iterator[int]:
    """The attention kernel's vector lanes for the test: 8 (AVX2), 16 (AVX-512, where the CPU has
    it, and then its own choice), restored after."""
    ext = kernels._extension()
    try:
        before = ext.attention_lanes(request.param)
    except RuntimeError:
        pytest.skip("no AVX-512 on this CPU")
    yield request.param
    ext.attention_lanes(before)


@needs_attend
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["cache32", "cache16"])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", ATTEND_CASES)
def test_attend_matches_float64(tokens: list[tuple[int, int]], heads: int, kv_heads: int,
                                head_dim: int, cache_dtype: torch.dtype,
                                attention_lanes: int) -> None:
    """Against float64 over the cache's values (a bfloat16 cache's widened exactly), at both
    vector widths."""
    q, k, v, rows, pos = _attend_data(tokens, heads, kv_heads, head_dim)
    scale = head_dim ** -0.5
    y = kernels.attend(q, k.to(cache_dtype), v.to(cache_dtype), rows, pos, scale)
    k, v = k.to(cache_dtype).float(), v.to(cache_dtype).float()
    assert y.shape == q.shape and y.dtype == torch.float32
    group = heads // kv_heads
    for t, (row, p) in enumerate(tokens):
        ks = k[row, :, :p + 1].double().repeat_interleave(group, 0)  # (heads, L, hd)
        vs = v[row, :, :p + 1].double().repeat_interleave(group, 0)
        w = torch.softmax(q[t].double()[:, None] @ ks.transpose(1, 2) * scale, dim=-1)
        ref = (w @ vs)[:, 0]
        assert (y[t].double() - ref).abs().max() < 2e-6 * max(1.0, ref.abs().max().item())
        sdpa = F.scaled_dot_product_attention(q[t][None, :, None], k[row:row + 1, :, :p + 1],
                                              v[row:row + 1, :, :p + 1],
                                              enable_gqa=group > 1)[0, :, 0]
        assert torch.allclose(y[t], sdpa, rtol=1e-5, atol=1e-5)


@needs_attend
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["cache32", "cache16"])
def test_attend_tokens_do_not_depend_on_the_pass(cache_dtype: torch.dtype,
                                                 attention_lanes: int) -> None:
    tokens = [(0, 50), (1, 3), (1, 4), (1, 5), (2, 1000), (3, 0), (3, 1), (0, 2500), (2, 1024)]
    q, k, v, rows, pos = _attend_data(tokens, 9, 3, 64, seed=1)
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    together = kernels.attend(q, k, v, rows, pos, 0.125)
    for t in range(len(tokens)):
        alone = kernels.attend(q[t:t + 1], k, v, rows[t:t + 1], pos[t:t + 1], 0.125)
        assert torch.equal(together[t], alone[0]), t


@needs_attend
def test_attend_checks_its_inputs() -> None:
    q, k, v, rows, pos = _attend_data([(0, 3)], 4, 2, 16)
    with pytest.raises(RuntimeError, match="row or position"):
        kernels.attend(q, k, v, rows, torch.tensor([1100]), 0.25)
    with pytest.raises(RuntimeError, match="row or position"):
        kernels.attend(q, k, v, torch.tensor([4]), pos, 0.25)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.attend(q.bfloat16(), k, v, rows, pos, 0.25)
    assert not kernels.serves_attention(q.bfloat16(), k)  # the model takes SDPA there
    assert not kernels.serves_attention(torch.zeros(1, 4, 12), torch.zeros(1, 2, 8, 12))
    assert kernels.serves_attention(q, k) and kernels.serves_attention(q, k.bfloat16())
    assert not kernels.serves_attention(q, k.half())
    with pytest.raises(RuntimeError, match="bfloat16 caches"):
        kernels.attend(q, k.bfloat16(), v, rows, pos, 0.25)  # keys and values alike


@needs_attend
def test_compiled_calls_trace_through_attend() -> None:
    torch._dynamo.reset()
    q, k, v, rows, pos = _attend_data([(0, 9), (2, 30), (2, 31)], 6, 3, 32, seed=2)

    def step(q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return kernels.attend(q * 2, k, v, rows, pos, 0.2) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, pos), step(q, pos))


def _rope_data(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
               seed: int = 0, cache_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """qkv, freqs, rows, pos and zeroed caches (4 rows of 200 positions) for rope_write."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 3).to(dtype)
    pos = torch.randperm(200, generator=g)[:tokens]  # distinct: each token its own entry
    rows = torch.randint(0, 4, (tokens,), generator=g)
    caches = [torch.zeros(4, kv_heads, 200, head_dim, dtype=cache_dtype) for _ in range(2)]
    return qkv, rope_cache(200, head_dim, 500000.0, None)[pos], rows, pos, *caches


def _rope_reference(qkv: torch.Tensor, freqs: torch.Tensor, rows: torch.Tensor,
                    pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    heads: int) -> torch.Tensor:
    """rope_write by PyTorch's ops, as the model's compiled passes compute it: apply_rope on
    the heads into float32, the cache by index_put (rounding into a bfloat16 cache)."""
    kv_heads = k_cache.shape[1]
    x = qkv.view(1, qkv.shape[0], heads + 2 * kv_heads, -1)
    qk = apply_rope(x[:, :, :heads + kv_heads], freqs, torch.float32)[0]
    k_cache[rows, :, pos] = qk[:, heads:].to(k_cache.dtype)
    v_cache[rows, :, pos] = x[0, :, heads + kv_heads:].float().to(v_cache.dtype)
    return qk[:, :heads]


ROPE_CASES = [(1, 9, 3, 64), (7, 4, 4, 8), (70, 32, 8, 128), (3, 6, 2, 24)]


@needs_attend
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["cache32", "cache16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", ROPE_CASES)
def test_rope_write_gives_pytorchs_rotation_and_cache_bit_for_bit(
        tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
        cache_dtype: torch.dtype) -> None:
    """rope_write rotates as rope.apply_rope into float32 does (the same float32 products and
    sums, for bfloat16 heads too) and writes the cache as index_put does (a bfloat16 cache's
    keys and values rounded once, as .to(bfloat16) rounds): the model's numbers do not change
    with it."""
    qkv, freqs, rows, pos, k_cache, v_cache = _rope_data(tokens, heads, kv_heads, head_dim, dtype,
                                                         cache_dtype=cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = kernels.rope_write(qkv, freqs, k_cache, v_cache, rows, pos, heads)
    q_ref = _rope_reference(qkv, freqs, rows, pos, k_ref, v_ref, heads)
    assert q.dtype == torch.float32 and q.shape == (tokens, heads, head_dim)
    assert torch.equal(q, q_ref) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # and against float64: each pair of a query head turned by its angle
    x = qkv.double().view(tokens, heads + 2 * kv_heads, head_dim // 2, 2)[:, :heads]
    c, s = freqs.double()[:, None, :, 0], freqs.double()[:, None, :, 1]
    turned = torch.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], -1)
    torch.testing.assert_close(q.double(), turned.flatten(-2), rtol=1e-6, atol=1e-5)


@needs_attend
def test_rope_write_checks_its_inputs() -> None:
    qkv, freqs, rows, pos, k_cache, v_cache = _rope_data(5, 6, 2, 16, torch.float32, seed=3)
    assert kernels.serves_rope(qkv, k_cache) and kernels.serves_rope(qkv.bfloat16(), k_cache)
    assert not kernels.serves_rope(qkv.half(), k_cache)
    assert kernels.serves_rope(qkv, k_cache.bfloat16()) and not kernels.serves_rope(qkv, k_cache.half())
    with pytest.raises(RuntimeError, match="row or position"):
        kernels.rope_write(qkv, freqs, k_cache, v_cache, rows, pos + 200, 6)
    with pytest.raises(RuntimeError, match="row or position"):
        kernels.rope_write(qkv, freqs, k_cache, v_cache, rows + 4, pos, 6)
    with pytest.raises(RuntimeError, match="caches"):
        kernels.rope_write(qkv, freqs, k_cache.bfloat16(), v_cache, rows, pos, 6)
    with pytest.raises(RuntimeError, match="freqs"):
        kernels.rope_write(qkv, freqs[:, :4], k_cache, v_cache, rows, pos, 6)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.rope_write(qkv.half(), freqs, k_cache, v_cache, rows, pos, 6)


@pytest.mark.slow
@needs_attend
def test_compiled_rotation_gets_the_kernels_numbers() -> None:
    """Compiled passes rotate by PyTorch's form, which inductor fuses into its own code: the
    same queries and cache as the eager kernel, bit for bit, for any number of tokens, from
    float32 and from bfloat16 heads (rotated into float32: a bfloat16 result, which eager
    PyTorch rounds to and inductor's code does not, would make the two differ)."""
    torch._dynamo.reset()
    compiled = torch.compile(_rope_reference, fullgraph=True, dynamic=True)
    try:
        for tokens, dtype in [(1, torch.float32), (3, torch.float32), (17, torch.float32),
                              (2, torch.bfloat16), (9, torch.bfloat16)]:
            qkv, freqs, rows, pos, k_cache, v_cache = _rope_data(tokens, 6, 2, 64, dtype,
                                                                 seed=tokens)
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            q = kernels.rope_write(qkv, freqs, k_cache, v_cache, rows, pos, 6)
            assert torch.equal(q, compiled(qkv, freqs, rows, pos, k_ref, v_ref, 6)), tokens
            assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), tokens
    finally:
        torch._dynamo.reset()


@needs_attend
@pytest.mark.parametrize("dim", [576, 64, 13, 1])
def test_rms_norm_matches_float64(dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 5, dim, generator=g) * 4
    w = torch.randn(dim, generator=g)
    ref = w.double() * x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    y = kernels.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=1e-6)
    # each row alone gives its numbers in the batch, bit for bit
    assert torch.equal(kernels.rms_norm(x[1, 3:4], w, 1e-5), y[1, 3:4])
    # and the model's norm runs it
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data.copy_(w)
    assert torch.equal(norm(x), y)


@needs_attend
@pytest.mark.parametrize("n", [128256, 49152, 1000, 33, 32, 31, 7, 1])
def test_argmax_matches_torch_max(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g)
    if n > 3:
        x[1, n // 3] = x[1, n - 1] = x[1].max() + 1  # a tie: the first wins
        x[2, :] = -float("inf")  # all -inf: index 0
        x[3, n - 1] = float("inf")  # in the tail
        x[4, 1:] = x[4, 0]  # all equal
        x[5, n // 2], x[5, n // 2 + 1] = -0.0, 0.0  # signed zeros tie with each other
        x[5, n // 2 + 2:] = -1.0
        x[5, :n // 2] = -1.0
    ids = kernels.argmax(x)
    assert ids is not None and ids.dtype == torch.long and ids.shape == (6,)
    assert torch.equal(ids, x.max(dim=-1).indices)
    assert torch.equal(kernels.argmax(x[3]), x[3].max(dim=-1).indices)  # one row: a 0-dim result
    assert torch.equal(kernels.argmax(x.view(2, 3, n)), x.view(2, 3, n).max(dim=-1).indices)
    assert torch.equal(sampling.greedy(x), x.max(dim=-1).indices)  # greedy decoding runs it
    # a row with NaN: torch.max's answer (NaN counts as the largest), for every row
    x[0, n // 2] = float("nan")
    assert torch.equal(kernels.argmax(x), x.max(dim=-1).indices)


def test_argmax_leaves_other_dtypes_and_devices_to_torch() -> None:
    assert kernels.argmax(torch.randn(4, 10).bfloat16()) is None
    assert kernels.argmax(torch.randn(4, 10, device="meta")) is None
    assert torch.equal(sampling.greedy(torch.tensor([[1.0, 3.0, 3.0]]).bfloat16()),
                       torch.tensor([1]))


@needs_attend
@pytest.mark.parametrize("hidden", [1536, 86, 5])
def test_silu_mul_matches_float64(hidden: int) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(4, 2 * hidden, generator=g) * 5
    x[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])  # exp's clamps and signed zeros
    gate, up = x.double().chunk(2, dim=-1)
    ref = F.silu(gate) * up
    y = kernels.silu_mul(x)
    assert y.shape == (4, hidden) and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-30)
    assert torch.equal(kernels.silu_mul(x[2:3]), y[2:3])


@needs_attend
@pytest.mark.parametrize("dim", [576, 64, 13])
def test_bf16_rowwise_kernels_round_the_float32_results_once(dim: int) -> None:
    """bfloat16 rows are computed as float32 ones and each value rounded to nearest even:
    exactly the float32 kernels' results, rounded, and a row alone gives its numbers in a batch."""
    g = torch.Generator().manual_seed(dim + 1)
    x = torch.randn(2, 7, dim, generator=g).bfloat16() * 3
    w = torch.randn(dim, generator=g).bfloat16()
    y = kernels.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.equal(y, kernels.rms_norm(x.float(), w.float(), 1e-6).bfloat16())
    assert torch.equal(kernels.rms_norm(x[1, 2:3], w, 1e-6), y[1, 2:3])
    norm = RMSNorm(dim, 1e-6).bfloat16()
    norm.weight.data.copy_(w)
    assert torch.equal(norm(x), y)  # the model's norm runs it on bfloat16 too
    gu = torch.randn(5, 2 * dim, generator=g).bfloat16() * 4
    gu[0, :3] = torch.tensor([float("nan"), 1e30, -1e30])  # NaN stays NaN; huge values round
    h = kernels.silu_mul(gu)
    assert h.dtype == torch.bfloat16 and h.shape == (5, dim)
    torch.testing.assert_close(h, kernels.silu_mul(gu.float()).bfloat16(), rtol=0, atol=0,
                               equal_nan=True)
    assert torch.equal(kernels.silu_mul(gu[3:4]), h[3:4])


@needs_attend
def test_rowwise_kernels_check_their_inputs() -> None:
    with pytest.raises(RuntimeError, match="x and weight alike"):
        kernels.rms_norm(torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.rms_norm(torch.zeros(2, 8).half(), torch.ones(8).half(), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        kernels.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="even"):
        kernels.silu_mul(torch.zeros(2, 7))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.silu_mul(torch.zeros(2, 8).half())
    assert kernels.serves_rowwise(torch.zeros(2, dtype=torch.bfloat16))
    assert not kernels.serves_rowwise(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16))
    assert not kernels.serves_rowwise(torch.zeros(2).half())
    assert kernels.serves_rowwise(torch.zeros(2), torch.zeros(3))


@pytest.mark.slow
@needs_attend
def test_compiled_code_gets_eagers_numbers_from_the_rowwise_kernels() -> None:
    """Inductor's own code for the norm and silu rounds differently from eager PyTorch; through
    the kernels, a compiled layer's feed-forward gives eager's numbers bit for bit, for any
    number of rows (one graph, the rows a symbol)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data.copy_(torch.randn(64, generator=g))
    w13 = torch.randn(2 * 172, 64, generator=g) / 8
    w2 = torch.randn(64, 172, generator=g) / 13

    def ffn(x: torch.Tensor) -> torch.Tensor:
        return x + linear(kernels.silu_mul(linear(norm(x), w13)), w2)

    compiled = torch.compile(ffn, fullgraph=True, dynamic=True)
    try:
        with torch.no_grad():
            for rows in (3, 9, 40):
                x = torch.randn(1, rows, 64, generator=g)
                assert torch.equal(compiled(x), ffn(x)), rows
    finally:
        torch._dynamo.reset()


def test_wheels_carry_the_kernel_sources(tmp_path: Path) -> None:
    """The kernels are built from their C++ sources on the user's machine at first use: a wheel
    of llamarun (pip install from PyPI or a folder, not editable) must hold every one of them."""
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: no build/ folder left from an earlier build can answer
    shutil.copytree(repo / "llamarun", src / "llamarun",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("llamarun-*.whl"))).namelist())
    folder = Path(kernels.__file__).parent
    needed = [p.name for p in kernels.SOURCES] + [p.name for p in folder.glob("*.h")]
    assert "kernels.h" in needed
    assert {f"llamarun/kernels/{n}" for n in needed} <= names


def test_summary_names_each_kernels_row_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # `llamarun info` says how many rows each kernel serves here: the int8 one's own limit
    # (32 with AVX512-VNNI, 4,096 with AVX2), not the bf16 one's 8.
    text = kernels.summary(torch.device("cpu"))
    if not any(kernels._features()):
        assert text.startswith("PyTorch's")
        return
    if kernels.int8_available():
        assert f"passes of 1-{kernels.int8_max_rows()} rows" in text
    if kernels.bf16_available():
        assert f"bf16: passes of 1-{kernels.MAX_ROWS} rows" in text
    monkeypatch.setenv(kernels.ENV, "0")
    assert kernels.summary(torch.device("cpu")) == f"PyTorch's ({kernels.ENV}=0)"
    assert kernels.summary(torch.device("meta")) == "PyTorch's"


def test_no_cuda_runtime_notice_of_cpp_extension_is_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA build of PyTorch on a machine without a GPU warns as torch.utils.cpp_extension
    loads (every command: the kernels build or load through it); llamarun drops that one record
    and lets the logger's others through."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addHandler(caplog.handler)  # (the CLI's tests may stop propagation to the root)
    try:
        with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
            logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
            logger.warning("Error checking compiler version for %s", "c++")
    finally:
        logger.removeHandler(caplog.handler)
    # (a set: the record reaches the handler once or twice, by the root too where torch's loggers
    # propagate)
    assert {r.getMessage() for r in caplog.records} == {"Error checking compiler version for c++"}
