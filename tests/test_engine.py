"""Engine.complete and ChatSession on the real stories260K model."""

from __future__ import annotations

import pytest
import torch

from llamarun import kernels
from llamarun.config import ModelArgs
from llamarun.engine import Engine
from llamarun.errors import InvalidArgumentError, PromptTooLongError
from llamarun.generation import Token
from llamarun.sampling import SamplingParams
from llamarun.scheduler import Request
from engine_util import engine, one_thread, stories_meta  # noqa: F401
from model_util import random_meta_state_dict, write_meta_folder

GREEDY = SamplingParams.greedy()
PROMPT = "Once upon a time"


def test_complete_streams_the_decoded_continuation(engine: Engine) -> None:
    gen = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=30)
    chunks = list(gen)
    r = gen.result
    assert "".join(c.text for c in chunks) == r.text
    assert r.text == engine.tokenizer.decode(list(r.token_ids))
    assert r.text.startswith(", there was a little girl named Lily")
    assert r.finish_reason == "length" and r.completion_tokens == 30
    assert r.prompt_tokens == len(engine.encode_prompt(PROMPT)) == 5
    assert r.decode_tok_s == pytest.approx(29 / r.decode_s)  # 29 steps after the first token
    assert [c.token_id for c in chunks] == list(r.token_ids)


def test_stop_string_is_never_emitted(engine: Engine) -> None:
    gen = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=30, stop=["Lily"])
    text = "".join(c.text for c in gen)
    assert text == ", there was a little girl named "
    assert gen.result.finish_reason == "stop" and gen.result.text == text


def test_stop_id_ends_generation(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=10)
    full = [c.token_id for c in ids]
    monkeypatch.setattr(engine.tokenizer, "stop_ids", frozenset({full[4]}))
    gen = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=10)
    list(gen)
    r = gen.result
    assert r.finish_reason == "stop" and list(r.token_ids) == full[:4] and r.completion_tokens == 5
    # The slot holds the prompt and the replies' tokens written so far; a repeat of the same
    # prompt prefills only its last token.
    assert engine.cache.slots[0].ids == engine.encode_prompt(PROMPT) + full[:4]
    again = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=3)
    list(again)
    assert again.result.prompt_tokens == 5 and again.result.prefill_tokens == 1
    assert list(again.result.token_ids) == full[:3]


def test_context_finish_and_too_long_prompt(one_thread: None) -> None:
    small = Engine.load(stories_meta(), device="cpu", max_seq_len=12)
    gen = small.complete(PROMPT, sampling=GREEDY, max_new_tokens=100)
    list(gen)
    assert gen.result.finish_reason == "context" and gen.result.completion_tokens == 12 - 5
    with pytest.raises(PromptTooLongError):
        small.complete("Once upon a time there was a girl named Lily who", max_new_tokens=5)


def test_seed_reproduces_sampled_text(engine: Engine) -> None:
    def run(seed: int) -> str:
        params = SamplingParams(temperature=1.0, seed=seed)
        gen = engine.complete(PROMPT, sampling=params, max_new_tokens=40)
        return "".join(c.text for c in gen)
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_echo_and_close(engine: Engine) -> None:
    gen = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=20, echo=True)
    first = next(gen)
    assert first.text == PROMPT and first.token_id is None
    with pytest.raises(RuntimeError):
        gen.result
    next(gen)
    gen.close()
    assert gen.result.finish_reason == "cancelled" and gen.result.completion_tokens == 1


def test_bad_arguments(engine: Engine) -> None:
    with pytest.raises(InvalidArgumentError):
        engine.complete(PROMPT, max_new_tokens=0)
    # token ids outside the vocabulary: one message naming the id, before anything runs
    vocab = engine.args.vocab_size
    for ids, bad in (([1, vocab, 2], vocab), ([-1], -1)):
        with pytest.raises(InvalidArgumentError,
                           match=f"token id {bad} is not in the model's vocabulary"):
            engine.complete(ids, max_new_tokens=2)
        with pytest.raises(InvalidArgumentError, match=f"token id {bad} is not in"):
            next(engine.token_events(ids, max_new_tokens=2))
        with pytest.raises(InvalidArgumentError, match=f"token id {bad} is not in"):
            engine.score([1, *ids], first=1)
    edge = engine.complete([1, vocab - 1], max_new_tokens=2, sampling=GREEDY)
    list(edge)
    assert edge.result.prompt_tokens == 2 and edge.result.completion_tokens >= 1


def test_chat_second_turn_prefills_only_new_tokens(engine: Engine) -> None:
    session = engine.chat(system="You tell stories.")
    g1 = session.send("Hi", sampling=GREEDY, max_new_tokens=12)
    list(g1)
    first_prompt = engine.chat_format.encode_dialog(
        [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Hi"}])
    assert g1.prompt_tokens == len(first_prompt)
    history = session.dialog
    followup = engine.chat_format.encode_followup(history, [{"role": "user", "content": "More"}])
    g2 = session.send("More", sampling=GREEDY, max_new_tokens=12)
    reply2 = [c.token_id for c in g2 if c.token_id is not None]
    cached_all = first_prompt + list(g1.result.token_ids) + followup
    assert g2.prompt_tokens == len(cached_all)
    # Only the reply's last token (never written) and the new turn are prefilled.
    assert g2.result.prefill_tokens == len(followup) + 1 == session.last_prefill
    # The cached conversation gives the same reply as prefilling everything from scratch.
    engine.cache.truncate(engine.cache.slots[0], 0)
    fresh = engine.generate(cached_all, sampling=GREEDY, max_new_tokens=12)
    assert [c.token_id for c in fresh if c.token_id is not None] == reply2
    assert fresh.result.prefill_tokens == len(cached_all)
    assert session.context_used == len(cached_all) + len(reply2)


def test_chat_drops_oldest_turns_when_full(one_thread: None) -> None:
    small = Engine.load(stories_meta(), device="cpu", max_seq_len=96)
    session = small.chat(system="Be brief.")
    dropped = 0
    for i in range(6):
        gen = session.send(f"Tell me story number {i}", sampling=GREEDY, max_new_tokens=16)
        list(gen)
        dropped += gen.dropped_turns
        assert session.context_used <= small.max_seq_len
        assert gen.result.finish_reason in ("length", "stop")
    assert dropped > 0
    assert session.dialog[0] == {"role": "system", "content": "Be brief."}
    assert session.messages[-2]["content"] == "Tell me story number 5"
    assert len(session.messages) < 12


def test_a_long_resumed_chat_drops_turns_in_few_encodings(engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping old turns to fit encodes the dialog O(log turns) times (not once per dropped
    turn), and drops the fewest that make room."""
    session = engine.chat()
    session.messages = [m for i in range(400) for m in (
        {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."})]
    fmt = engine.chat_format
    calls = []
    real = type(fmt).encode_dialog
    monkeypatch.setattr(type(fmt), "encode_dialog",
                        lambda self, dialog: calls.append(len(dialog)) or real(self, dialog))
    gen = session.send("Last one?", sampling=GREEDY, max_new_tokens=8)
    assert len(calls) <= 14  # 1 + log2(400) + 1
    kept = session.messages[:-1]  # the new message is appended
    assert 0 < gen.dropped_turns < 400 and len(kept) == 2 * (400 - gen.dropped_turns)
    limit = engine.max_seq_len - min(8, engine.max_seq_len // 4)
    assert len(fmt.encode_dialog([*kept, {"role": "user", "content": "Last one?"}])) <= limit
    k = gen.dropped_turns - 1  # the last pair dropped, kept: it would not fit
    pair = [{"role": "user", "content": f"Question {k}?"}, {"role": "assistant", "content": "Yes."}]
    assert len(fmt.encode_dialog([*pair, *kept, {"role": "user", "content": "Last one?"}])) > limit
    gen.close()


def test_chat_clear_and_cancel(engine: Engine) -> None:
    session = engine.chat()
    gen = session.send("Hello", sampling=GREEDY, max_new_tokens=30)
    next(gen)
    next(gen)
    gen.close()  # Ctrl-C in the CLI
    assert gen.result.finish_reason == "cancelled"
    g2 = session.send("Again", sampling=GREEDY, max_new_tokens=5)
    list(g2)
    assert len(session.messages) == 4
    session.clear()
    g3 = session.send("Hello", sampling=GREEDY, max_new_tokens=5)
    list(g3)
    # The cache still starts with the first turn's prompt: only the rest is prefilled again.
    dialog = engine.chat_format.encode_dialog([{"role": "user", "content": "Hello"}])
    assert g3.result.prefill_tokens == 1
    fresh = engine.generate(dialog, sampling=GREEDY, max_new_tokens=5)
    list(fresh)
    assert fresh.result.token_ids == g3.result.token_ids
    engine.cache.truncate(engine.cache.slots[0], 0)  # someone else's use of the cache: the session prefills it all
    g4 = session.send("Hi", sampling=GREEDY, max_new_tokens=5)
    list(g4)
    assert g4.result.prefill_tokens == g4.prompt_tokens > len(dialog)
    session.clear()
    unstarted = session.send("Ignored", sampling=GREEDY, max_new_tokens=5)
    session.set_system("New rules")  # closes the unstarted reply and forgets its message
    assert unstarted.result.finish_reason == "cancelled" and session.messages == []
    list(session.send("Go", sampling=GREEDY, max_new_tokens=5))
    assert session.dialog[0]["content"] == "New rules" and len(session.messages) == 2


def test_warmup_runs_steps_through_the_scheduler(engine: Engine) -> None:
    steps = engine.scheduler.steps
    engine.warmup(steps=3)
    assert engine.scheduler.steps - steps == 3  # three decode passes after the prefill
    bos = engine.tokenizer.bos_id
    assert engine.cache.slots[0].ids[:1] == [bos] and len(engine.cache.slots[0].ids) == 4


@pytest.mark.slow
def test_compiled_decode_matches_eager(engine: Engine) -> None:
    compiled = Engine(engine.checkpoint, engine.tokenizer, engine.chat_format, compile=True)
    try:
        compiled.warmup()  # compiles (cached by inductor after the first run)
        assert compiled.compiled_ready
        gen = compiled.complete(PROMPT, sampling=GREEDY, max_new_tokens=20)
        list(gen)
        eager = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=20)
        list(eager)
        assert gen.result.token_ids == eager.result.token_ids
        # Across a KV bucket boundary (256): the same graph serves the longer attention span.
        ids = engine.encode_prompt(PROMPT)
        long_prompt = (ids * (250 // len(ids) + 1))[:250]
        gen = compiled.complete(long_prompt, sampling=GREEDY, max_new_tokens=12)
        list(gen)
        eager = engine.complete(long_prompt, sampling=GREEDY, max_new_tokens=12)
        list(eager)
        assert gen.result.token_ids == eager.result.token_ids
        assert gen.result.completion_tokens == 12
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_background_compile_takes_over_between_generations(one_thread: None) -> None:
    """Replies start eagerly while the decode graphs compile in a thread; a generation never
    switches kinds of step midway, and the next one runs compiled. The model is stored int8
    (kernel and fallback products both inside the compiled graph)."""
    eager = Engine.load(stories_meta(), device="cpu", dtype="float32", quantize="int8")
    compiled = Engine(eager.checkpoint, eager.tokenizer, eager.chat_format, compile=True)
    try:
        assert compiled.compiles_in_background and compiled.compile_in_background()
        during = compiled.complete(PROMPT, sampling=GREEDY, max_new_tokens=20)
        next(during)
        compiled.wait_compiled()  # ready now, but `during` stays eager to its end
        list(during)
        assert compiled.compiled_ready and not compiled.compiled_in_use
        expect = eager.complete(PROMPT, sampling=GREEDY, max_new_tokens=40)
        list(expect)
        assert during.result.token_ids == expect.result.token_ids[:20]
        # Every later position runs the one graph: a recompile would raise here.
        with torch._dynamo.config.patch(error_on_recompile=True):
            after = compiled.complete(PROMPT, sampling=GREEDY, max_new_tokens=40)
            list(after)
        assert compiled.compiled_in_use
        assert after.result.token_ids == expect.result.token_ids
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_batched_step_does_not_depend_on_the_batch(one_thread: None) -> None:
    """The compiled decode graphs (one per batch bucket: 1, 2, 4 rows, with or without a prompt
    chunk beside them) give each request the tokens it gets alone, whatever else is decoded or
    prefilled with it, with no recompiles."""
    eng = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=128, slots=4,
                      compile=True, prefill_chunk=8)
    prompts = [PROMPT, "Lily went", "The cat sat on the", "Once"]
    try:
        eng.wait_compiled()
        alone = []
        for p in prompts:
            g = eng.complete(p, sampling=GREEDY, max_new_tokens=16)
            list(g)
            alone.append(g.result.token_ids)
        assert eng.compiled_in_use
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n in (2, 3, 4):  # buckets 2 and 4 (3 rows: padded to 4)
                gens = [eng.complete(p, sampling=GREEDY, max_new_tokens=16) for p in prompts[:n]]
                chunks = [next(g) for g in gens]  # all submitted: decoded together from here
                assert all(c.token_id is not None for c in chunks)
                for g in gens:
                    list(g)
                assert [g.result.token_ids for g in gens] == alone[:n]
            # A prompt arriving while others generate is prefilled 8 tokens at a time inside
            # their decode passes (the mixed graphs), and nobody's tokens change.
            mixed, calls = eng.runner._mixed, []
            eng.runner._mixed = lambda *a: calls.append(1) or mixed(*a)
            long_prompt = eng.encode_prompt(prompts[0] + " and a dog named Max lived in a house")
            gens = [eng.complete(p, sampling=GREEDY, max_new_tokens=16) for p in prompts[1:3]]
            for g in gens:
                next(g)  # both generating from here
            late = eng.complete(long_prompt, sampling=GREEDY, max_new_tokens=16)
            next(late)  # submitted (generations submit on their first chunk) and prefilled
            for g in gens + [late]:
                list(g)
            assert len(calls) >= 2
            assert [g.result.token_ids for g in gens] == alone[1:3]
            alone_late = eng.complete(long_prompt, sampling=GREEDY, max_new_tokens=16)
            list(alone_late)
            assert late.result.token_ids == alone_late.result.token_ids
    finally:
        torch._dynamo.reset()


SMALL = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, hidden_dim=128,
                  head_dim=8, rope_theta=10000.0, max_seq_len=128)
SMALL_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 512,
                "ffn_dim_multiplier": 0.75, "multiple_of": 128, "norm_eps": 1e-5,
                "rope_theta": 10000.0}


def _small_folder(tmp_path, seed: int):
    """A Meta folder of a random SMALL model (weights from `seed`) with stories260K's tokenizer."""
    folder = write_meta_folder(tmp_path / "m", SMALL_PARAMS, [random_meta_state_dict(SMALL, seed=seed)])
    (folder / "tokenizer.model").write_bytes((stories_meta() / "tokenizer.model").read_bytes())
    return folder


def _greedy_request(ids: list[int], n: int) -> Request:
    return Request(ids, SamplingParams.greedy(), n, reuse=False, stop_ids=False, text=False,
                   top_logprobs=3)


def _drain(eng: Engine, ticket) -> list:
    """The (token id, top log-probabilities) of a ticket's tokens, stepping the scheduler."""
    out = []
    while not (ticket.done and not ticket.events):
        if not ticket.events:
            eng.scheduler.step()
        while ticket.events:
            e = ticket.events.popleft()
            if isinstance(e, Token):
                out.append((e.chunk.token_id, e.top))
    return out


@pytest.mark.skipif(not (kernels.int4_available() and kernels.attend_available()),
                    reason="llamarun's AVX2 kernels do not serve every op on this machine")
def test_bfloat16_4bit_prompt_gets_its_logits_alone_or_in_chunks(tmp_path, one_thread: None) -> None:  # noqa: F811
    """bfloat16 with 4-bit weights, eager: a 100-token prompt prefilled alone (one pass of 100
    rows: on a CPU with AMX, the 4-bit kernel's AMX tiles) and the same prompt prefilled in
    8-token chunks beside a decoding request (9-row passes: its AVX512-VNNI or AVX2 tiles) get
    the same log-probabilities at every step, bit for bit."""
    folder = _small_folder(tmp_path, seed=6)
    eng = Engine.load(folder, device="cpu", dtype="bfloat16", max_seq_len=128, slots=2,
                      quantize="int4", group_size=32, prefill_chunk=8)
    assert kernels.INT4_GEMM_ROWS > 100  # (longer prompts alone: the dequantized GEMM)
    g = torch.Generator().manual_seed(1)
    prompt = [1] + torch.randint(3, 512, (99,), generator=g).tolist()
    other = [1] + torch.randint(3, 512, (12,), generator=g).tolist()
    passes = eng.scheduler.prefill_passes
    alone = _drain(eng, eng.submit(_greedy_request(prompt, 8)))
    assert eng.scheduler.prefill_passes - passes == 1
    first = eng.submit(_greedy_request(other, 40))
    for _ in range(3):
        eng.scheduler.step()  # `first` generating from here
    passes = eng.scheduler.prefill_passes
    late = _drain(eng, eng.submit(_greedy_request(prompt, 8)))
    assert eng.scheduler.prefill_passes - passes == 13  # 100 tokens: 13 chunks beside `first`
    first.cancel()
    _drain(eng, first)
    assert len(late) == len(alone) == 8
    assert late == alone


@pytest.mark.skipif(not (kernels.int4_available() and kernels.attend_available()),
                    reason="llamarun's AVX2 kernels do not serve every op on this machine")
def test_short_prompt_packed_with_a_long_one_gets_its_logits_alone(tmp_path, one_thread: None) -> None:  # noqa: F811
    """Two prompts arriving together are prefilled in one pass of 150 + 40 rows, past
    kernels.INT4_GEMM_ROWS; the 40-token prompt's part is not (kernels.shortest_part), so the
    pass's 4-bit products stay the kernel's (on a CPU with AMX the dequantized GEMM would take
    them all) and the short prompt gets the log-probabilities it gets alone, bit for bit
    (bfloat16, eager)."""
    folder = _small_folder(tmp_path, seed=7)
    eng = Engine.load(folder, device="cpu", dtype="bfloat16", max_seq_len=256, slots=2,
                      quantize="int4", group_size=32)
    g = torch.Generator().manual_seed(2)
    short = [1] + torch.randint(3, 512, (39,), generator=g).tolist()
    long = [1] + torch.randint(3, 512, (149,), generator=g).tolist()
    assert len(short) < kernels.INT4_GEMM_ROWS <= len(short) + len(long)
    alone = _drain(eng, eng.submit(_greedy_request(short, 6)))
    passes = eng.scheduler.prefill_passes
    both = [eng.submit(_greedy_request(long, 6)), eng.submit(_greedy_request(short, 6))]
    replies = [_drain(eng, t) for t in both]
    assert eng.scheduler.prefill_passes - passes == 1  # one pass for the two
    assert replies[1] == alone


@pytest.mark.slow
@pytest.mark.skipif(not (kernels.int4_available() and kernels.int8_available()
                         and kernels.attend_available()),
                    reason="llamarun's AVX2 kernels do not serve every op on this machine")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_prefill_chunks_give_a_prompt_its_logits_alone(tmp_path, one_thread: None,  # noqa: F811
                                                                dtype: str) -> None:
    """With 4-bit weights on an AVX2 CPU, every op of a layer is one of llamarun's kernels or
    exact: a prompt arriving while another request decodes, prefilled in 8-token chunks inside
    the compiled mixed passes and then decoded beside it, gets at every step the
    log-probabilities it gets alone (prefilled by an eager pass, decoded in the one-row graph),
    bit for bit; in bfloat16 too (the rotary embedding into float32, with no bfloat16 round
    trip that inductor's code would leave out)."""
    folder = _small_folder(tmp_path, seed=4)
    eng = Engine.load(folder, device="cpu", dtype=dtype, max_seq_len=128, slots=2,
                      compile=True, quantize="int4", group_size=32, prefill_chunk=8)
    g = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, 512, (39,), generator=g).tolist()
    other = [1] + torch.randint(3, 512, (12,), generator=g).tolist()

    try:
        eng.wait_compiled()
        _drain(eng, eng.submit(_greedy_request(other, 2)))
        assert eng.compiled_in_use
        with torch._dynamo.config.patch(error_on_recompile=True):
            alone = _drain(eng, eng.submit(_greedy_request(prompt, 12)))
            first = eng.submit(_greedy_request(other, 60))
            for _ in range(3):
                eng.scheduler.step()  # `first` generating from here
            passes = eng.scheduler.prefill_passes
            late = _drain(eng, eng.submit(_greedy_request(prompt, 12)))
            assert eng.scheduler.prefill_passes - passes == 5  # 40 tokens: 5 chunks beside `first`
            first.cancel()
            _drain(eng, first)
        assert len(late) == len(alone) == 12
        assert late == alone  # ids and log-probabilities, bit for bit
    finally:
        torch._dynamo.reset()


def test_a_busy_slot_is_never_taken(engine: Engine) -> None:
    """A second generation while the first holds the only slot waits for it to end (it is not
    cancelled): the first's tokens are those it gives alone."""
    alone = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=20)
    list(alone)
    first = engine.complete(PROMPT, sampling=GREEDY, max_new_tokens=20)
    started = [next(first), next(first)]
    second = engine.complete("Lily went", sampling=GREEDY, max_new_tokens=5)
    list(second)
    assert second.result.finish_reason == "length"
    rest = list(first)
    assert first.result.token_ids == alone.result.token_ids
    assert [c.token_id for c in started + rest if c.token_id is not None] == \
        list(alone.result.token_ids)
    assert first.result.finish_reason == alone.result.finish_reason


def test_lone_surrogates_in_text_are_replaced(engine: Engine) -> None:
    """A str that is not valid Unicode (lone surrogates, as surrogateescape makes) is encoded as
    U+FFFD, as invalid UTF-8 bytes are, instead of failing inside the tokenizer library."""
    tok = engine.tokenizer
    assert tok.encode("a\udcffb", bos=False) == tok.encode("a\ufffdb", bos=False)
    gen = engine.complete("Once \udcff upon a time", sampling=GREEDY, max_new_tokens=3)
    list(gen)
    assert gen.result.completion_tokens == 3
    session = engine.chat()
    list(session.send("Hi \ud800", sampling=GREEDY, max_new_tokens=2))


def test_releasing_the_callers_cpu_worker_threads_keeps_every_thread_computing_alike() -> None:
    """device.release_cpu_worker_threads (Scheduler.start calls it): with PyTorch's GNU OpenMP
    it lets the calling thread's pool go; ops in this thread and in others give the same
    results after it as before (the pool comes back when needed)."""
    import sys
    import threading

    from llamarun.device import release_cpu_worker_threads

    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))
    before = x @ w
    released = release_cpu_worker_threads()
    if sys.platform == "linux" and torch.backends.openmp.is_available():
        assert released  # PyTorch's Linux CPU builds use GNU OpenMP
    out: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: out.append(x @ w))
    t.start()
    t.join()
    assert torch.equal(out[0], before)
    assert torch.equal(x @ w, before)
    assert torch.equal(torch.add(x, 1.0).sum(0), (x + 1).sum(0))
