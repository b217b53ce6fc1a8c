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
    # On CUDA the generator queues the next step before reading a token back (lookahead).
    results = []
    for e in engines:
        gen = e.complete(PROMPT, sampling=SamplingParams.greedy(), max_new_tokens=32)
        list(gen)
        results.append(gen.result.token_ids)
    assert results[1] == results[0]


def test_bfloat16_default_dtype_and_chat(engines):
    gpu = Engine.load(require_fixture("stories260K", "meta"), device="cuda")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    session = gpu.chat()
    reply = session.send("Tell me a story.", sampling=SamplingParams.greedy(), max_new_tokens=16)
    assert "".join(c.text for c in reply).strip()
    assert reply.result.completion_tokens > 0


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_match_cpu(quantize):
    # CUDA runs the dequantize-in-forward path (no CPU weight-only kernels there).
    folder = require_fixture("stories260K", "meta")
    ids = [1, 403, 407, 261, 378, 432, 383, 286]
    out = []
    for device in ("cpu", "cuda"):
        e = Engine.load(folder, device=device, dtype="float32", quantize=quantize)
        with torch.inference_mode():
            t = torch.tensor([ids], device=e.device)
            out.append(e.model(t, torch.arange(len(ids), device=e.device)).cpu())
    # CPU's kernels round activations to bfloat16; CUDA computes in float32 here.
    rel = ((out[1] - out[0]).norm() / out[0].norm()).item()
    assert rel < 2e-2


def test_compiled_cuda_graph_step_gives_eager_tokens(engines):
    _, gpu = engines
    compiled = Engine(gpu.checkpoint, gpu.tokenizer, gpu.chat_format, compile=True)
    try:
        assert compiled.compiles_in_background  # no CUDA graphs: rows' lengths vary
        compiled.warmup()
        results = []
        for e in (gpu, compiled):
            gen = e.complete(PROMPT, sampling=SamplingParams.greedy(), max_new_tokens=32)
            list(gen)
            results.append(gen.result.token_ids)
        assert results[1] == results[0]
    finally:
        torch._dynamo.reset()
