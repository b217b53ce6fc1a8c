"""The decoder and the token loop: cached decoding matches full forwards; slots, chunks,
lookahead, budgets, and batched steps that do not depend on the batch."""

from __future__ import annotations

import pytest
import torch

from llamarun.decoder import Decoder, kv_bucket
from llamarun.engine import Engine
from llamarun.generate import generate_tokens
from llamarun.sampling import SamplingParams, make_generator
from llamarun.slots import UNKNOWN, Slot, SlotPool, common_prefix
from engine_util import engine, one_thread, stories_meta  # noqa: F401

GREEDY = SamplingParams.greedy()
PROMPT = [1, 403, 407, 261, 378]  # <s> Once upon a time


def greedy_ids(engine: Engine, prompt: list[int], n: int, slot: Slot | None = None,
               **kw: object) -> list[int]:
    slot = slot if slot is not None else Slot(0)
    return [e.id for e in generate_tokens(engine.decoder, slot, prompt, sampling=GREEDY,
                                          generator=None, max_new_tokens=n, **kw)]


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


def test_slot_records_what_the_cache_holds(engine: Engine) -> None:
    slot = Slot(0)
    ids = greedy_ids(engine, PROMPT, 6, slot=slot)
    assert slot.ids == PROMPT + ids[:-1]  # the last token is sampled, not yet written
    # Continuing from the slot prefills only the new tail and gives what a fresh slot gives.
    more = greedy_ids(engine, PROMPT + ids, 4, slot=slot)
    assert more == greedy_ids(engine, PROMPT + ids, 4)
    assert slot.keep_prefix(PROMPT + [9, 9]) == len(PROMPT) and slot.ids == PROMPT
    assert slot.keep_prefix(PROMPT) == len(PROMPT) - 1  # one id is always left to prefill


def test_chunked_prefill_equals_one_pass(engine: Engine) -> None:
    tokens = PROMPT + greedy_ids(engine, PROMPT, 40)
    whole = engine.decoder.prefill(Slot(0), tokens).clone()
    chunked = engine.decoder.prefill(Slot(0), tokens, chunk_size=7)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_lookahead_and_logprobs(engine: Engine) -> None:
    plain_slot, ahead_slot = Slot(0), Slot(0)
    plain = list(generate_tokens(engine.decoder, plain_slot, PROMPT, sampling=GREEDY,
                                 generator=None, max_new_tokens=12, logprobs=True))
    ahead = list(generate_tokens(engine.decoder, ahead_slot, PROMPT, sampling=GREEDY,
                                 generator=None, max_new_tokens=12, logprobs=True, lookahead=True))
    assert [e.id for e in plain] == [e.id for e in ahead]
    assert [e.pos for e in plain] == list(range(len(PROMPT), len(PROMPT) + 12))
    assert plain_slot.ids == ahead_slot.ids == PROMPT + [e.id for e in plain][:-1]
    assert UNKNOWN not in ahead_slot.ids
    for a, b in zip(plain, ahead):
        assert a.logprob is not None and b.logprob is not None
        assert a.logprob <= 0 and abs(a.logprob - b.logprob) < 1e-4


def test_never_yields_past_the_context(engine: Engine) -> None:
    prompt = (PROMPT * engine.max_seq_len)[:engine.max_seq_len - 3]
    events = list(generate_tokens(engine.decoder, Slot(0), prompt, sampling=GREEDY,
                                  generator=None, max_new_tokens=50))
    assert [e.pos for e in events] == [engine.max_seq_len - 3, engine.max_seq_len - 2,
                                       engine.max_seq_len - 1]


def test_seeded_sampling_reproduces(engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed: int) -> list[int]:
        return [e.id for e in generate_tokens(engine.decoder, Slot(0), PROMPT, sampling=params,
                                              generator=make_generator(engine.device, seed),
                                              max_new_tokens=30)]
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_repeat_penalty_sees_the_prompt(engine: Engine) -> None:
    prompt = PROMPT + [432, 383, 286]  # greedy next: 261 ("a"), which the prompt holds already
    assert greedy_ids(engine, prompt, 1) == [261]
    params = SamplingParams(temperature=0.0, repeat_penalty=5.0)
    events = generate_tokens(engine.decoder, Slot(0), prompt, sampling=params, generator=None,
                             max_new_tokens=1)
    assert next(iter(events)).id != 261
    short = SamplingParams(temperature=0.0, repeat_penalty=5.0, repeat_last_n=2)  # sees 383, 286
    events = generate_tokens(engine.decoder, Slot(0), prompt, sampling=short, generator=None,
                             max_new_tokens=1)
    assert next(iter(events)).id == 261


def test_batched_steps_do_not_depend_on_the_batch(one_thread: None) -> None:
    """Four sequences decoded together give, bit for bit, the logits each gives alone."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=4)
    prompts = [PROMPT, [1, 403], [1, 261, 378, 403, 407, 261, 300, 301], [1, 9, 9, 9]]
    slots = eng.slots.slots
    firsts = [int(eng.decoder.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
    together: list[torch.Tensor] = []
    tokens = firsts
    for _ in range(6):
        logits = eng.decoder.step(slots, torch.tensor(tokens), tokens)
        together.append(logits.clone())
        tokens = logits.argmax(-1).tolist()
    for i in (2, 0, 3, 1):  # alone, in another slot order, from fresh slots
        slot = eng.slots.slots[i]
        slot.clear()
        eng.decoder.prefill(slot, prompts[i])
        token = firsts[i]
        for step in range(6):
            logits = eng.decoder.step([slot], torch.tensor([token]), [token])[0]
            assert torch.equal(logits, together[step][i]), (i, step)
            token = int(logits.argmax())


def test_slot_pool_prefers_shared_prefixes_and_steals_the_oldest() -> None:
    pool = SlotPool(2)
    a, b = object(), object()
    s0 = pool.acquire([1, 2, 3], a)
    assert s0 is not None
    s0.ids[:] = [1, 2, 3]
    pool.release(s0, a)
    other = pool.acquire([7], b)
    assert other is not None and other is not s0  # the unused one, keeping s0's prefix
    pool.release(other, b)
    assert pool.acquire([1, 2, 9], a) is s0  # the one sharing [1, 2]
    assert pool.acquire([5], b) is other
    assert pool.acquire([5], object()) is None and pool.free == 0
    thief = object()
    assert pool.acquire([5], thief, steal=True) is s0 and s0.owner is thief
    pool.release(s0, a)  # the old owner no longer holds it: a no-op
    assert s0.owner is thief
    assert common_prefix([1, 2, 3], [1, 2]) == 2


def test_step_refuses_a_full_sequence(engine: Engine) -> None:
    slot = Slot(0)
    slot.ids = [0] * engine.max_seq_len
    with pytest.raises(Exception, match="full"):
        engine.decoder.step([slot], torch.tensor([1]), [1])


def test_kv_bucket() -> None:
    assert kv_bucket(0, 4096) == 256
    assert kv_bucket(255, 4096) == 256
    assert kv_bucket(256, 4096) == 512
    assert kv_bucket(500, 300) == 300
