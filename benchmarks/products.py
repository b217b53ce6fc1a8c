"""GB/s of the decode-sized weight products, per shape, row count and kernel.

Weights are cache-cold: each kernel cycles through enough copies of the matrix to exceed the
CPU's caches (--pool MiB), so the time is the time to stream them from memory. GB/s counts the
weight bytes only (int8: 1 byte per weight; int4: half a byte plus the group scales).

Kernels:
  bf16:  F.linear (oneDNN/MKL), compiled (x.unsqueeze(-2) * w).sum(-1) (model.Linear's form
         under torch.compile, one row only, --compile), ours (kernels.bf16_linear: vdpbf16ps;
         also inside a compiled function with --compile)
  fp32:  oneDNN (device.linear's path where ours does not serve), compiled multiply + sum
         (--compile, one row), ours (kernels.f32_linear: AVX2 FMA, CPUs without AVX-512)
  int8:  aten._weight_int8pack_mm (bf16 activations), compiled multiply + sum (Int8Linear's
         one-token form without PyTorch's kernel, --compile), ours (kernels.int8_linear: vpdpbusd)
  int4:  aten._weight_int4pack_mm_for_cpu (group 32), ours (kernels.int4_linear: AVX2
         vpmaddubsw, or vpdpbusd on CPUs with AVX512-VNNI; group 32, float16 scales and zeros)

"read (dot)" is a plain read of as many bytes as the bfloat16 weights (a float32 dot product of
two halves), timed in the same turns. For one row, "ours rows" and "ours blocks" are the bf16, int8 and float32 kernels with the weight
rows taken one at a time or 8 (float32: 12) at once; "ours" is the order this CPU uses (rows on
AMD CPUs, kernels.h's ROW_STREAM). --huge-pages puts the weights in huge pages, as a loaded
model's are (llamarun.hugepages). --hot times each kernel on one copy of the weights that it has
just read (from the CPU's caches, where they fit in them: the L3 of the AMD EPYC Zen 4 holds 32
MiB): what the kernel computes at most, the ceiling its decode meets where memory reads faster.

    python benchmarks/products.py [--models smollm2,1b] [--rows 1,2,4,8] [--reps 15] [--compile]
        [--threads N] [--pool MiB] [--huge-pages] [--hot]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llamarun import hugepages, kernels
from llamarun.device import _onednn_linear

_ARENA: hugepages.Arena | None = None  # --huge-pages: where the weights go
_HOT = False  # --hot: every timing on one copy of the weights, just read (see the docstring)
HOT_CALLS = 8  # calls timed per turn with --hot


def _placed(t: torch.Tensor) -> torch.Tensor:
    """t, copied into huge pages under --huge-pages."""
    if _ARENA is None:
        return t
    out = _ARENA.empty(t.shape, t.dtype)
    return out.copy_(t)

# (name, N, K) of each distinct product of a layer, and the output head.
MODELS = {
    "smollm2": [("wqkv", 960, 576), ("wo", 576, 576), ("w13", 3072, 576), ("w2", 576, 1536),
                ("output", 49152, 576)],
    "1b": [("wqkv", 3072, 2048), ("wo", 2048, 2048), ("w13", 16384, 2048), ("w2", 2048, 8192),
           ("output", 128256, 2048)],
}


def _interleaved(runs: list[tuple[Callable[[int], object], int]], reps: int) -> list[float]:
    """Median seconds of one call of each run, each call on the next copy of its weights.

    The runs take turns within each repetition, so a busy period of a shared machine hits
    them alike and their ratios stay meaningful.
    """
    for fn, copies in runs:
        for i in range(min(copies, 4)):
            fn(i)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for j, (fn, copies) in enumerate(runs):
            if _HOT:  # one copy, read just before: from the caches where it fits
                fn(0)
                t0 = time.perf_counter()
                for _ in range(HOT_CALLS):
                    fn(0)
                times[j].append((time.perf_counter() - t0) / HOT_CALLS)
                continue
            t0 = time.perf_counter()
            for i in range(copies):
                fn(i)
            times[j].append((time.perf_counter() - t0) / copies)
    return [statistics.median(t) for t in times]


def _copies(nbytes: int, pool_mib: int) -> int:
    return 1 if _HOT else max(1, -(-pool_mib * 2**20 // nbytes))


def bench_shape(n: int, k: int, rows: list[int], *, reps: int, pool: int,
                compile_: bool) -> list[tuple[str, int, float]]:
    """[(kernel, M, GB/s)] for one (N, K) weight."""
    out: list[tuple[str, int, float]] = []
    g = torch.Generator().manual_seed(0)
    nb = _copies(n * k * 2, pool)
    wb = [_placed(torch.randn(n, k, generator=g).bfloat16()) for _ in range(nb)]
    q8 = [_placed(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g))
          for _ in range(_copies(n * k, pool))]
    s8 = torch.rand(n, generator=g).bfloat16()
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    p4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    w4 = [p4.clone() for _ in range(_copies(n * k // 2, pool))]
    sz = torch.rand(k // 32, n, 2, generator=g).bfloat16()
    int4_bytes = n * k // 2 + sz.numel() * 2
    o4 = [_placed(kernels.int4_pack(q4.to(torch.uint8)))
          for _ in range(_copies(n * k // 2, pool))]
    d4 = kernels.int4_pack_groups((torch.rand(n, k // 32, generator=g) / 50).half(), k)
    z4 = kernels.int4_pack_groups((torch.randn(n, k // 32, generator=g) / 20).half(), k)
    ours4_bytes = n * k // 2 + n * (k // 32) * 4
    # a plain read of as many bytes as a bfloat16 copy, taking its turn beside the kernels: the
    # ceiling of the same minutes (a shared machine's read rate changes between minutes)
    read_bytes = n * k * 2
    reads = [(_placed(torch.ones(n * k // 4)), _placed(torch.ones(n * k // 4))) for _ in range(nb)]
    compiled = compiled_ours = compiled_int8 = None
    if compile_:  # model.Linear's and Int8Linear's one-token forms under torch.compile
        torch._dynamo.reset()  # one compile per shape; the recompile limit counts shapes
        compiled = torch.compile(lambda x, w: (x.unsqueeze(-2) * w).sum(-1), dynamic=False)
        compiled_int8 = torch.compile(
            lambda x, q, s: (x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * s.to(x.dtype),
            dynamic=False)
        compiled_ours = torch.compile(kernels.dense_linear, dynamic=False, fullgraph=True)
    for m in rows:
        x = torch.randn(m, k, generator=g).bfloat16()
        runs: list[tuple[str, int, Callable[[int], object], int]] = [
            ("bf16 F.linear", n * k * 2, lambda i: F.linear(x, wb[i]), nb),
        ]
        if compiled is not None and m == 1:
            runs.append(("bf16 compiled mul+sum", n * k * 2, lambda i: compiled(x, wb[i]), nb))
        if kernels.bf16_available():
            ext = kernels._extension()
            runs.append(("bf16 ours", n * k * 2, lambda i: ext.bf16_linear(x, wb[i]), nb))
            if m == 1:
                runs += [(f"bf16 ours {order}", n * k * 2,
                          (lambda o: lambda i: ext.bf16_linear_by(x, wb[i], o))(order), nb)
                         for order in ("rows", "blocks")]
            if compiled_ours is not None and m == 1:
                runs.append(("bf16 ours compiled", n * k * 2,
                             lambda i: compiled_ours(x, wb[i]), nb))
        runs.append(("int8 aten", n * k,
                     lambda i: torch.ops.aten._weight_int8pack_mm(x, q8[i], s8), len(q8)))
        if compiled_int8 is not None and m == 1:
            runs.append(("int8 compiled mul+sum", n * k,
                         lambda i: compiled_int8(x, q8[i], s8), len(q8)))
        if kernels.int8_available():
            ext = kernels._extension()
            runs.append(("int8 ours", n * k,
                         lambda i: ext.int8_linear(x, q8[i], s8), len(q8)))
            if m == 1 and kernels._features()[1]:  # (the AVX2 int8 kernel has one order)
                runs += [(f"int8 ours {order}", n * k,
                          (lambda o: lambda i: ext.int8_linear_by(x, q8[i], s8, o))(order),
                          len(q8))
                         for order in ("rows", "blocks")]
        runs.append(("int4 aten g32", int4_bytes,
                     lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4[i], 32, sz),
                     len(w4)))
        if kernels.int4_available():
            ext = kernels._extension()
            runs.append(("int4 ours g32", ours4_bytes,
                         lambda i: ext.int4_linear(x, o4[i], d4, z4, 32, n), len(o4)))
        runs.append(("read (dot)", read_bytes, lambda i: torch.dot(*reads[i]), len(reads)))
        with torch.inference_mode():
            secs = _interleaved([(fn, copies) for _, _, fn, copies in runs], reps)
        out += [(name, m, nbytes / s / 1e9) for (name, nbytes, _, _), s in zip(runs, secs)]
    del wb, reads
    wf = [_placed(torch.randn(n, k, generator=g)) for _ in range(_copies(n * k * 4, pool))]
    for m in rows:
        x = torch.randn(m, k, generator=g)
        runs = [("fp32 oneDNN", lambda i: _onednn_linear(x, wf[i]))]
        if compiled is not None and m == 1:
            runs.append(("fp32 compiled mul+sum", lambda i: compiled(x, wf[i])))
        if kernels.f32_available():
            ext = kernels._extension()
            runs.append(("fp32 ours", lambda i: ext.f32_linear(x, wf[i])))
            if m == 1:
                runs += [(f"fp32 ours {order}",
                          (lambda o: lambda i: ext.f32_linear_by(x, wf[i], o))(order))
                         for order in ("rows", "blocks")]
        with torch.inference_mode():
            secs = _interleaved([(fn, len(wf)) for _, fn in runs], reps)
        out += [(name, m, n * k * 4 / s / 1e9) for (name, _), s in zip(runs, secs)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,1b")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--pool", type=int, default=128, help="MiB of weight copies per kernel")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--compile", action="store_true", help="also the compiled mul+sum form")
    parser.add_argument("--huge-pages", action="store_true",
                        help="weights in huge pages (llamarun.hugepages), as a loaded model's")
    parser.add_argument("--hot", action="store_true",
                        help="one copy of the weights, read just before each timing (cached)")
    args = parser.parse_args()
    global _HOT
    _HOT = args.hot
    if args.huge_pages:
        global _ARENA
        _ARENA = hugepages.Arena()
    rows = [int(r) for r in args.rows.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, ours: "
          f"bf16 {kernels.bf16_available()}, int8 {kernels.int8_available()}, "
          f"int4 {kernels.int4_available()}, fp32 {kernels.f32_available()}")
    print(f"{'model':8} {'matrix':7} {'N x K':>13} {'kernel':22} " +
          " ".join(f"{'M=' + str(m):>7}" for m in rows) + "   (GB/s of weights)")
    for model in args.models.split(","):
        for name, n, k in MODELS[model]:
            results = bench_shape(n, k, rows, reps=args.reps, pool=args.pool,
                                  compile_=args.compile)
            for kernel in dict.fromkeys(r[0] for r in results):
                cells = {m: gbs for kn, m, gbs in results if kn == kernel}
                print(f"{model:8} {name:7} {f'{n}x{k}':>13} {kernel:22} " +
                      " ".join(f"{cells[m]:7.1f}" if m in cells else f"{'':>7}" for m in rows),
                      flush=True)


if __name__ == "__main__":
    main()
