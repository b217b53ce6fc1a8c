"""The generation core: the runner and cache manager, the scheduler's loop (prefix reuse, slot
rule, chunked prefill, budgets, cancellation), and batches that do not change a row's tokens."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llamarun import kernels
from llamarun.cache_manager import CacheManager, Slot, common_prefix
from llamarun.engine import Engine
from llamarun.generation import GenerationResult, Scored, Token
from llamarun.runner import Write, bucket_for, buckets
from llamarun.sampling import SamplingParams
from llamarun.scheduler import QueueFull, Request, Scheduler
from engine_util import engine, one_thread, stories_meta  # noqa: F401

GREEDY = SamplingParams.greedy()
PROMPT = [1, 403, 407, 261, 378]  # <s> Once upon a time


def greedy_ids(engine: Engine, prompt: list[int], n: int, **kw: object) -> list[int]:
    return [e.id for e in engine.token_events(prompt, max_new_tokens=n, **kw)]


def run_all(sched: Scheduler, tickets: list) -> dict[int, list]:
    """Drive the loop until every ticket has its final event; each ticket's events."""
    out: dict[int, list] = {id(t): [] for t in tickets}
    pending = list(tickets)
    while pending:
        t = pending[0]
        e = sched.next_event(t)
        out[id(t)].append(e)
        if t.done and not t.events:
            pending.remove(t)
    return out


def tokens_of(events: list) -> list[int]:
    return [e.chunk.token_id for e in events if isinstance(e, Token)]


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
            engine.cache.clear()  # the cache was reallocated: nothing is held
    assert logits[0, len(PROMPT) - 1:-1].argmax(-1).tolist() == ids


def test_golden_greedy_tokens(engine: Engine) -> None:
    # stories260K's greedy continuation of "Once upon a time" (", there was a little girl named Lily")
    assert greedy_ids(engine, PROMPT, 8) == [432, 383, 286, 261, 376, 298, 315, 421]


def test_slot_records_what_the_cache_holds(engine: Engine) -> None:
    slot = engine.cache.slots[0]
    ids = greedy_ids(engine, PROMPT, 6, reuse=False)
    assert slot.ids == PROMPT + ids[:-1]  # the last token is sampled, not yet written
    # Continuing from the slot prefills only the new tail and gives what a fresh slot gives.
    gen = engine.generate(PROMPT + ids, sampling=GREEDY, max_new_tokens=4)
    list(gen)
    assert gen.result.reused_tokens == len(PROMPT) + len(ids) - 1
    assert list(gen.result.token_ids) == greedy_ids(engine, PROMPT + ids, 4, reuse=False)
    cache = engine.cache
    assert cache.keep_prefix(slot, PROMPT + [9, 9]) == len(PROMPT) and slot.ids == PROMPT
    assert cache.keep_prefix(slot, PROMPT) == len(PROMPT) - 1  # one id is always left to prefill


def test_chunked_prefill_equals_one_pass(engine: Engine) -> None:
    """A prompt prefilled in one pass or in chunks of 7 (as the scheduler prefills beside decode
    rows) gives the same logits: bit for bit where the attention and row-wise kernels serve
    (every token computed on its own), else to float32 rounding."""
    tokens = PROMPT + greedy_ids(engine, PROMPT, 75)  # past 64 (once SDPA's, chunks the kernel's)
    cache = CacheManager(1, engine.max_seq_len)
    from llamarun.runner import Runner

    runner = Runner(engine.model, cache)
    slot = cache.slots[0]
    whole = runner.run([Write.last(slot, tokens)]).clone()
    cache.truncate(slot, 0)
    for i in range(0, len(tokens), 7):
        chunk = tokens[i:i + 7]
        last = runner.run([Write.last(slot, chunk)])
    assert slot.ids == tokens
    if kernels.attend_available():
        assert torch.equal(whole, last)
    else:
        assert torch.allclose(whole, last, atol=1e-5)
    engine.cache.clear()  # this runner wrote row 0 behind the engine's manager


def test_positions_and_logprobs(engine: Engine) -> None:
    gen = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=12, logprobs=True)
    chunks = [c for c in gen if c.token_id is not None]
    events = list(engine.token_events(PROMPT, max_new_tokens=12, reuse=False))
    assert [c.token_id for c in chunks] == [e.id for e in events]
    assert [e.pos for e in events] == list(range(len(PROMPT), len(PROMPT) + 12))
    for c in chunks:
        assert c.logprob is not None and c.logprob <= 0


def test_never_yields_past_the_context(engine: Engine) -> None:
    prompt = (PROMPT * engine.max_seq_len)[:engine.max_seq_len - 3]
    events = list(engine.token_events(prompt, max_new_tokens=50))
    assert [e.pos for e in events] == [engine.max_seq_len - 3, engine.max_seq_len - 2,
                                       engine.max_seq_len - 1]


def test_seeded_sampling_reproduces(engine: Engine) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        return greedy_ids(engine, PROMPT, 30, sampling=params)
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_repeat_penalty_sees_the_prompt(engine: Engine) -> None:
    prompt = PROMPT + [432, 383, 286]  # greedy next: 261 ("a"), which the prompt holds already
    assert greedy_ids(engine, prompt, 1) == [261]
    params = SamplingParams(temperature=0.0, repeat_penalty=5.0)
    assert greedy_ids(engine, prompt, 1, sampling=params) != [261]
    short = SamplingParams(temperature=0.0, repeat_penalty=5.0, repeat_last_n=2)  # sees 383, 286
    assert greedy_ids(engine, prompt, 1, sampling=short) == [261]


PROMPTS = [PROMPT, [1, 403], [1, 261, 378, 403, 407, 261, 300, 301], [1, 9, 9, 9]]


def test_batched_steps_do_not_depend_on_the_batch(one_thread: None) -> None:
    """Four sequences decoded together give, bit for bit, the logits each gives alone."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=4)
    cache, runner = eng.cache, eng.runner
    slots = cache.slots
    firsts = [int(runner.run([Write.last(s, p)])[0].argmax()) for s, p in zip(slots, PROMPTS)]
    together: list[torch.Tensor] = []
    tokens = firsts
    for _ in range(6):
        logits = runner.run([Write.last(s, [t]) for s, t in zip(slots, tokens)])
        together.append(logits.clone())
        tokens = logits.argmax(-1).tolist()
    for i in (2, 0, 3, 1):  # alone, in another slot order, from fresh slots
        slot = slots[i]
        cache.truncate(slot, 0)
        runner.run([Write.last(slot, PROMPTS[i])])
        token = firsts[i]
        for step in range(6):
            logits = runner.run([Write.last(slot, [token])])[0]
            assert torch.equal(logits, together[step][i]), (i, step)
            token = int(logits.argmax())


@pytest.mark.skipif(not kernels.int4_available(), reason="no 4-bit kernel on this machine")
def test_prompts_prefilled_together_give_each_ones_logits_alone(one_thread: None) -> None:  # noqa: F811
    """8 prompts of 40 tokens in one pass (as the scheduler prefills requests that arrive
    together, nobody generating: 320 rows) give, bit for bit, each prompt's logits alone (40
    rows): the 4-bit products run the same kernel for both (not a dequantized GEMM past 256
    rows, which forked greedy replies of the default model)."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=8,
                      quantize="int4")
    slots = eng.cache.slots
    prompts = [[1] + [(37 * i + 11 * j) % 500 + 3 for j in range(39)] for i in range(8)]
    together = eng.runner.run([Write.last(s, p) for s, p in zip(slots, prompts)])
    for slot, prompt, logits in zip(slots, prompts, together):
        eng.cache.truncate(slot, 0)
        assert torch.equal(eng.runner.run([Write.last(slot, prompt)])[0], logits)


def test_a_prompt_chunk_beside_decode_rows_changes_none_of_their_logits(one_thread: None) -> None:
    """Decode rows and another slot's prompt chunk in one pass (the scheduler's chunked
    prefill): the decode rows' logits are, bit for bit, those of the decode rows alone, whether
    the chunk is short or long (every token attends on its own)."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=3)
    cache, runner = eng.cache, eng.runner
    a, b, c = cache.slots
    runner.run([Write.silent(a, PROMPTS[2]), Write.silent(b, PROMPTS[0])])
    alone = runner.run([Write.last(a, [300]), Write.last(b, [301])])
    cache.truncate(a, len(PROMPTS[2]))
    cache.truncate(b, len(PROMPTS[0]))
    for chunk in (PROMPTS[2] * 3, PROMPTS[3], PROMPTS[2] * 9):
        cache.truncate(c, 0)
        mixed = runner.run([Write.last(a, [300]), Write.last(b, [301]), Write.last(c, chunk)])
        assert mixed.shape[0] == 3 and torch.equal(mixed[:2], alone)
        cache.truncate(a, len(PROMPTS[2]))
        cache.truncate(b, len(PROMPTS[0]))


def test_one_forward_serves_prefill_decode_and_verification_rows(one_thread: None) -> None:
    """A pass mixing a prefill span, one-token rows and a several-token row gives each row the
    logits it gets alone (to float32 rounding: the product shapes differ)."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=3)
    cache, runner = eng.cache, eng.runner
    a, b, c = cache.slots
    runner.run([Write.silent(b, PROMPTS[2]), Write.silent(c, PROMPTS[0])])
    mixed = runner.run([Write(a, PROMPTS[3], (0, 4)), Write.last(b, [300]),
                        Write(c, [432, 383, 286], (0, 3))])
    assert mixed.shape[0] == 4 + 1 + 3
    assert a.ids == PROMPTS[3] and b.ids == PROMPTS[2] + [300]
    assert c.ids == PROMPTS[0] + [432, 383, 286]
    for slot, ids, want, rows in ((a, PROMPTS[3], (0, 4), mixed[:4]),
                                  (b, PROMPTS[2] + [300], (8, 9), mixed[4:5]),
                                  (c, PROMPTS[0] + [432, 383, 286], (5, 8), mixed[5:])):
        cache.truncate(slot, 0)
        alone = runner.run([Write(slot, ids, want)])
        torch.testing.assert_close(alone, rows, rtol=1e-5, atol=1e-5)


def test_scheduler_batches_and_tokens_equal_alone(one_thread: None) -> None:
    """Requests submitted together share decode passes (continuous batching) and each gets
    exactly the tokens it gets alone; a request arriving late joins between steps."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=4)
    sched = eng.scheduler
    alone = [greedy_ids(eng, p, 10, reuse=False) for p in PROMPTS]
    tickets = [sched.submit(Request(p, GREEDY, 10, reuse=False, stop_ids=False)) for p in PROMPTS[:3]]
    steps = sched.steps
    # The fourth arrives after the others have started.
    for _ in range(3):
        sched.step()
    tickets.append(sched.submit(Request(PROMPTS[3], GREEDY, 10, reuse=False, stop_ids=False)))
    events = run_all(sched, tickets)
    for t, expect in zip(tickets, alone):
        assert tokens_of(events[id(t)]) == expect
        assert isinstance(events[id(t)][-1], GenerationResult)
    assert sched.batched_rows - 0 > 0 and (sched.steps - steps) < 4 * 9  # passes were shared


def test_a_busy_slot_is_never_taken_and_waiting_requests_queue(one_thread: None) -> None:
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=64, slots=2)
    sched = eng.scheduler
    t1 = sched.submit(Request(PROMPTS[0], GREEDY, 5))
    t2 = sched.submit(Request(PROMPTS[1], GREEDY, 5))
    sched.step()  # both admitted
    sched.max_queue = 1
    held = {s.owner for s in eng.cache.slots}
    assert held == {t1, t2} and eng.cache.free == 0
    t3 = sched.submit(Request(PROMPTS[2], GREEDY, 5))
    with pytest.raises(QueueFull):
        sched.submit(Request(PROMPTS[3], GREEDY, 5))
    sched.step()
    assert sched.busy == (2, 1)  # t3 waits: no slot is taken from a running request
    events = run_all(sched, [t1, t2, t3])
    assert all(isinstance(events[id(t)][-1], GenerationResult) for t in (t1, t2, t3))
    assert events[id(t3)][-1].finish_reason != "cancelled"


def test_slot_rule_prefers_shared_prefix_then_least_recently_used() -> None:
    cache = CacheManager(3, 64)
    a, b, c = object(), object(), object()
    s0 = cache.acquire([1, 2, 3], a)
    assert s0 is not None
    cache.record(s0, 0, [1, 2, 3])
    cache.release(s0, a)
    s1 = cache.acquire([7], b)
    assert s1 is not None and s1 is not s0  # an unused one: s0 keeps its prefix
    cache.release(s1, b)
    s2 = cache.acquire([8], c)
    assert s2 not in (s0, s1)  # the least recently used of those sharing nothing
    cache.release(s2, c)
    assert cache.acquire([1, 2, 9], a) is s0  # the one sharing [1, 2]
    assert cache.acquire([5], b) is s1  # least recently used of the rest
    assert cache.acquire([5], c) is s2
    assert cache.acquire([5], object()) is None and cache.free == 0  # busy slots are never taken
    cache.release(s0, b)  # not the owner: a no-op
    assert s0.owner is a
    with pytest.raises(RuntimeError):
        cache.record(s0, 5, [1])  # a gap would make the record false
    assert common_prefix([1, 2, 3], [1, 2]) == 2


def test_chunked_prefill_interleaves_with_decoding(one_thread: None) -> None:
    """A long prompt arriving while another request generates is prefilled a chunk per step:
    the running request gets a token every step meanwhile, and both get their tokens alone."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=256, slots=2,
                      prefill_chunk=16)
    sched = eng.scheduler
    long_prompt = (PROMPTS[2] * 30)[:150]
    alone_short = greedy_ids(eng, PROMPT, 40, reuse=False)
    alone_long = greedy_ids(eng, long_prompt, 5, reuse=False)
    t1 = sched.submit(Request(PROMPT, GREEDY, 40, reuse=False, stop_ids=False))
    sched.step()
    sched.step()
    t2 = sched.submit(Request(long_prompt, GREEDY, 5, reuse=False, stop_ids=False))
    got_during = 0
    passes = sched.prefill_passes
    while sched.prefill_passes - passes < 150 // 16 and not t2.done:
        before = len(t1.events)
        sched.step()
        got_during += len(t1.events) > before
    assert got_during >= 150 // 16 - 1  # a token for the running request at (nearly) every chunk
    events = run_all(sched, [t1, t2])
    assert tokens_of(events[id(t1)]) == alone_short
    assert tokens_of(events[id(t2)]) == alone_long


def test_cancel_frees_the_slot_at_once(engine: Engine) -> None:
    sched = engine.scheduler
    t = sched.submit(Request(PROMPT, GREEDY, 50))
    sched.step()
    assert engine.cache.free == 0
    t.cancel()
    sched.step()
    assert engine.cache.free == 1
    events = run_all(sched, [t])
    assert events[id(t)][-1].finish_reason == "cancelled"


def test_scoring_requests_keep_the_cache_record_true(engine: Engine) -> None:
    """A perplexity window goes through the scheduler like any request: the slot's record says
    what it holds, so a generation after it reuses only what is really there."""
    ids = PROMPT + greedy_ids(engine, PROMPT, 20, reuse=False)
    scored = engine.score(ids, first=3)
    assert isinstance(scored, Scored) and scored.tokens == len(ids) - 3
    assert engine.cache.slots[0].ids == ids
    gen = engine.generate(ids[:10], sampling=GREEDY, max_new_tokens=3)
    list(gen)
    assert gen.result.reused_tokens == 9
    # The same window scored again recomputes the positions it needs.
    assert engine.score(ids, first=3).nll == pytest.approx(scored.nll, rel=1e-6)


def test_step_refuses_a_full_sequence(engine: Engine) -> None:
    slot = Slot(0)
    slot.ids = [0] * engine.max_seq_len
    with pytest.raises(Exception, match="fit"):
        engine.runner.run([Write.last(slot, [1])])


def test_buckets() -> None:
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


def test_thread_and_synchronous_clients_share_one_loop(one_thread: None) -> None:
    """With the loop in a thread (the server), engine generations wait on it instead of driving
    it: the same tokens either way."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=64, slots=2)
    expect = greedy_ids(eng, PROMPT, 8, reuse=False)
    eng.scheduler.start()
    try:
        results: list[list[int]] = []
        threads = [threading.Thread(target=lambda: results.append(
            greedy_ids(eng, PROMPT, 8, reuse=False))) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert results == [expect, expect]
    finally:
        eng.scheduler.stop()
    deadline = time.time() + 5
    while eng.scheduler.running and time.time() < deadline:
        time.sleep(0.01)
    assert not eng.scheduler.running


def test_a_prompt_is_chunked_the_same_whoever_else_prefills(one_thread: None) -> None:  # noqa: F811
    """Requests prefilling together each take whole chunks: none is split at the remainder of
    another's, so its chunk boundaries (and so its logits' last bits) are its own."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=3,
                      prefill_chunk=8)
    sched, runner = eng.scheduler, eng.runner
    seen: list[list[int]] = []
    real = runner.run

    def spy(writes, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append([len(w.ids) for w in writes])
        return real(writes, **kw)

    runner.run = spy  # type: ignore[method-assign]
    t0 = sched.submit(Request(PROMPTS[0], GREEDY, 30, stop_ids=False))
    sched.step()  # t0 prefilled alone, generating from now on: chunks of 8 per pass
    seen.clear()
    t1 = sched.submit(Request(PROMPTS[2] + PROMPTS[2][1:], GREEDY, 3, stop_ids=False))  # 15 ids
    t2 = sched.submit(Request(PROMPTS[3], GREEDY, 3, stop_ids=False))  # 4 ids
    run_all(sched, [t0, t1, t2])
    chunks = [[n for n in p if n > 1] for p in seen if max(p) > 1]  # decode rows write one id
    assert chunks == [[8], [7], [4]]  # not [8], [7, 1], [3]
    # t0 was generating all along: each chunk shared its decode pass (after its decode rows)
    assert all(p[0] == 1 and p[-1] > 1 for p in seen if max(p) > 1)
