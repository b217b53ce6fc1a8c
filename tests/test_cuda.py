"""The same code on CUDA (skipped on machines without a GPU; run wherever one is present)."""

from __future__ import annotations

import pytest
import torch

from fixtures_util import require_fixture
from llamarun.engine import Engine
from llamarun.sampling import SamplingParams

pytestmark = pytest.mark.cuda
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engines():
    folder = require_fixture("stories260K", "meta")
    return (Engine.load(folder, device="cpu", dtype="float32"),
            Engine.load(folder, device="cuda", dtype="float32"))


def test_float32_logits_match_cpu(engines):
    cpu, gpu = engines
    ids = cpu.encode_prompt(PROMPT)
    out = []
    for e in engines:
        e.model.reset_caches()
        with torch.inference_mode():
            t = torch.tensor([ids], device=e.device)
            out.append(e.model(t, torch.arange(len(ids), device=e.device)).cpu())
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)


def test_streamed_greedy_tokens_match_cpu(engines):
    # On CUDA the generator queues the next step before reading a token back (lookahead), and
    # eager decode passes replay CUDA graphs of decode_window (recorded at first use).
    results = []
    for e in engines:
        gen = e.complete(PROMPT, sampling=SamplingParams.greedy(), max_new_tokens=80)
        list(gen)
        results.append(gen.result.token_ids)
    assert results[1] == results[0]
    graphed = engines[1].runner.eager_graphed
    assert graphed is not None and graphed.failed is None
    assert {w for _, w in graphed.graphs} == {64, 128}
    assert engines[0].runner.eager_graphed is None  # CPU: no graphs


def test_bfloat16_default_dtype_and_chat(engines):
    gpu = Engine.load(require_fixture("stories260K", "meta"), device="cuda")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    session = gpu.chat()
    reply = session.send("Tell me a story.", sampling=SamplingParams.greedy(), max_new_tokens=16)
    assert "".join(c.text for c in reply).strip()
    assert reply.result.completion_tokens > 0


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_match_cpu(quantize):
    # CUDA: int4 through the tensor-core kernel, int8 through llamarun's Triton kernel.
    folder = require_fixture("stories260K", "meta")
    ids = [1, 403, 407, 261, 378, 432, 383, 286]
    out = []
    for device in ("cpu", "cuda"):
        e = Engine.load(folder, device=device, dtype="float32", quantize=quantize)
        with torch.inference_mode():
            t = torch.tensor([ids], device=e.device)
            out.append(e.model(t, torch.arange(len(ids), device=e.device)).cpu())
    # Both round activations to bfloat16 for the weight-only kernels (CUDA: int4 only).
    rel = ((out[1] - out[0]).norm() / out[0].norm()).item()
    assert rel < 2e-2


def test_compiled_cuda_graph_step_gives_eager_tokens(engines):
    _, gpu = engines
    compiled = Engine(gpu.checkpoint, gpu.tokenizer, gpu.chat_format, compile=True)
    try:
        assert compiled.compiles_in_background
        compiled.warmup()
        results = []
        for e in (gpu, compiled):
            gen = e.complete(PROMPT, sampling=SamplingParams.greedy(), max_new_tokens=80)
            list(gen)
            results.append(gen.result.token_ids)
        assert results[1] == results[0]
        graphed = compiled.runner.graphed
        assert graphed is not None and graphed.failed is None
        # one batch bucket, the windows of 64 and 128 positions: recorded, then replayed
        assert {w for _, w in graphed.graphs} == {64, 128}
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("n,k,group", [(96, 256, 32), (64, 576, 64), (40, 96, 32), (36, 256, 32)])
def test_int4_tensor_core_layout_computes_the_dequantized_product(n, k, group):
    from llamarun.quant import Int4Linear, dequantize_int4, int4_layout, quantize_int4

    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(n + k)
    parts = quantize_int4(torch.randn(n, k, generator=g), group)
    layout = int4_layout(cuda, k, n, group)
    assert layout == ("plain" if n % 8 else "tinygemm")
    module = Int4Linear(k, n, group_size=group, layout=layout).to(cuda)
    module.load_state_dict(Int4Linear.state(parts, device=cuda, dtype=torch.bfloat16,
                                            layout=layout), assign=True)
    ref_w = dequantize_int4(parts).double()
    dense = module.dense(torch.float32).cpu().double()
    assert ((dense - ref_w).norm() / ref_w.norm()).item() < 1e-2  # bfloat16 scales and zeros
    for rows in (1, 5, 40):
        x = torch.randn(rows, k, generator=g)
        y = module(x.to(cuda, torch.bfloat16)).float().cpu().double()
        ref = x.double() @ ref_w.t()
        assert ((y - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("rows,n,k", [(1, 2048, 2048), (3, 100, 200), (8, 8192, 2048),
                                      (16, 17, 96), (1, 128256, 2048)])
def test_int8_triton_kernel_computes_the_dequantized_product(rows, n, k):
    from llamarun.quant import Int8Linear, cuda_kernels, dequantize_int8, quantize_int8
    from llamarun.quant.modules import int8_kernel

    cuda = torch.device("cuda")
    assert int8_kernel(cuda, k) == "cuda"
    g = torch.Generator().manual_seed(rows + n + k)
    parts = quantize_int8(torch.randn(n, k, generator=g))
    module = Int8Linear(k, n, kernel="cuda").to(cuda)
    module.load_state_dict(Int8Linear.state(parts, device=cuda, dtype=torch.bfloat16,
                                            kernel="cuda"), assign=True)
    x = torch.randn(rows, k, generator=g).bfloat16()
    ref = x.double() @ dequantize_int8(parts).double().t()
    y = cuda_kernels.int8_mm(x.to(cuda), module.weight, module.scales).cpu().double()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2  # bfloat16 scales and output
    assert torch.equal(module(x.to(cuda)).cpu().double(), y)  # forward hands it the kernel


@pytest.mark.parametrize("rows,n,k,group", [(1, 2048, 2048, 32), (4, 36, 256, 64), (16, 17, 128, 128)])
def test_int4_plain_triton_kernel_computes_the_dequantized_product(rows, n, k, group):
    # The layout of GPUs below compute capability 8.0 (run here on any GPU, the kernel forced).
    from llamarun.quant import Int4Linear, dequantize_int4, quantize_int4

    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(rows + n + k)
    parts = quantize_int4(torch.randn(n, k, generator=g), group)
    module = Int4Linear(k, n, group_size=group, layout="plain", kernel="cuda").to(cuda)
    module.load_state_dict(Int4Linear.state(parts, device=cuda, dtype=torch.bfloat16,
                                            layout="plain"), assign=True)
    x = torch.randn(rows, k, generator=g).bfloat16()
    ref = x.double() @ dequantize_int4(parts).double().t()
    y = module(x.to(cuda)).cpu().double()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2  # bfloat16 scales, zeros and output
