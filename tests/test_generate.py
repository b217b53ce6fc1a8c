"""The token loop: cached decoding matches full forwards; chunks, lookahead and budgets."""

from __future__ import annotations

import torch

from llamarun.engine import Engine
from llamarun.generate import generate_tokens, kv_bucket, prefill
from llamarun.sampling import SamplingParams, make_generator
from engine_util import engine, one_thread  # noqa: F401

GREEDY = SamplingParams.greedy()
PROMPT = [1, 403, 407, 261, 378]  # <s> Once upon a time


def greedy_ids(engine: Engine, prompt: list[int], n: int, **kw: object) -> list[int]:
    return [e.id for e in generate_tokens(engine.model, prompt, sampling=GREEDY, generator=None,
                                          max_new_tokens=n, **kw)]


def test_cached_greedy_matches_full_forward(engine: Engine) -> None:
    ids = greedy_ids(engine, PROMPT, 24)
    seq = PROMPT + ids
    model = engine.model
    with torch.inference_mode():
        model.setup_caches(1, model.max_seq_len, use_kv_cache=False)
        try:
            logits = model(torch.tensor([seq]), torch.arange(len(seq)))
        finally:
            model.setup_caches(1, model.max_seq_len)
    assert logits[0, len(PROMPT) - 1:-1].argmax(-1).tolist() == ids


def test_golden_greedy_tokens(engine: Engine) -> None:
    # stories260K's greedy continuation of "Once upon a time" (", there was a little girl named Lily")
    assert greedy_ids(engine, PROMPT, 8) == [432, 383, 286, 261, 376, 298, 315, 421]


def test_chunked_prefill_equals_one_pass(engine: Engine) -> None:
    tokens = torch.tensor(PROMPT + greedy_ids(engine, PROMPT, 40))
    with torch.inference_mode():
        whole = prefill(engine.model, tokens, 0).clone()
        chunked = prefill(engine.model, tokens, 0, chunk_size=7)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_lookahead_and_logprobs(engine: Engine) -> None:
    plain = list(generate_tokens(engine.model, PROMPT, sampling=GREEDY, generator=None,
                                 max_new_tokens=12, logprobs=True))
    ahead = list(generate_tokens(engine.model, PROMPT, sampling=GREEDY, generator=None,
                                 max_new_tokens=12, logprobs=True, lookahead=True))
    assert [e.id for e in plain] == [e.id for e in ahead]
    assert [e.pos for e in plain] == list(range(len(PROMPT), len(PROMPT) + 12))
    for a, b in zip(plain, ahead):
        assert a.logprob is not None and b.logprob is not None
        assert a.logprob <= 0 and abs(a.logprob - b.logprob) < 1e-4


def test_never_yields_past_the_context(engine: Engine) -> None:
    start = engine.max_seq_len - len(PROMPT) - 3
    events = list(generate_tokens(engine.model, PROMPT, start_pos=start, sampling=GREEDY,
                                  generator=None, max_new_tokens=50))
    assert [e.pos for e in events] == [engine.max_seq_len - 3, engine.max_seq_len - 2,
                                       engine.max_seq_len - 1]


def test_seeded_sampling_reproduces(engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed: int) -> list[int]:
        return [e.id for e in generate_tokens(engine.model, PROMPT, sampling=params,
                                              generator=make_generator(engine.device, seed),
                                              max_new_tokens=30)]
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_repeat_penalty_sees_history(engine: Engine) -> None:
    params = SamplingParams(temperature=0.0, repeat_penalty=5.0)
    base = greedy_ids(engine, PROMPT, 1)[0]
    events = generate_tokens(engine.model, PROMPT, sampling=params, generator=None,
                             max_new_tokens=1, history=[base])
    assert next(iter(events)).id != base


def test_kv_bucket() -> None:
    assert kv_bucket(0, 4096) == 256
    assert kv_bucket(255, 4096) == 256
    assert kv_bucket(256, 4096) == 512
    assert kv_bucket(500, 300) == 300
