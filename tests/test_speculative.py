"""Speculative decoding (llamarun.speculative, scheduler._verify): greedy output equal to plain
decoding token for token (float32, stories260K and SmolLM2, draft model and prompt lookup, at
the end of the context, with stop strings and stop ids inside accepted runs), the sampled
accept/reject rule against the target's distribution (chi-square), the drafters, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine_util import one_thread, run_cli, stories_meta  # noqa: F401 (fixture)
from fixtures_util import require_default_model
from llamarun.engine import Engine
from llamarun.errors import InvalidArgumentError
from llamarun.sampling import SamplingParams, logits_to_probs
from llamarun.runner import Write
from llamarun.scheduler import Request
from llamarun.speculative import (
    Draft, DraftModel, RowState, SpecConfig, Speculator, _NgramIndex, accept,
)

GREEDY = SamplingParams.greedy()
PROMPT = "Once upon a time"


def _load(path: object, **kw: object) -> Engine:
    return Engine.load(path, device="cpu", dtype="float32", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plain(one_thread: None) -> Engine:  # noqa: F811
    return _load(stories_meta(), max_seq_len=512, slots=2)


@pytest.fixture(scope="module")
def lookup(one_thread: None) -> Engine:  # noqa: F811
    e = _load(stories_meta(), max_seq_len=512, slots=2)
    e.speculate(SpecConfig(draft_tokens=5, lookup=3))
    return e


@pytest.fixture(scope="module")
def drafted(one_thread: None) -> Engine:  # noqa: F811
    """stories260K drafted for by itself stored as int8: mostly, not always, accepted."""
    e = _load(stories_meta(), max_seq_len=512, slots=2)
    e.load_draft(stories_meta(), config=SpecConfig(draft_tokens=4), quantize="int8")
    return e


def _run(engine: Engine, prompt: str = PROMPT, **kw: object):
    g = engine.complete(prompt, sampling=kw.pop("sampling", GREEDY), **kw)  # type: ignore[arg-type]
    text = "".join(c.text for c in g)
    return text, g.result


@pytest.mark.parametrize("which", ["lookup", "drafted"])
def test_greedy_equals_plain_decoding(plain: Engine, which: str,
                                      request: pytest.FixtureRequest) -> None:
    spec: Engine = request.getfixturevalue(which)
    text0, r0 = _run(plain, max_new_tokens=300)
    text1, r1 = _run(spec, max_new_tokens=300)
    assert r1.token_ids == r0.token_ids and text1 == text0
    assert r1.finish_reason == r0.finish_reason == "length"
    # Drafts were proposed and some kept, in fewer target passes than tokens.
    assert r1.drafted_tokens > 0 and 0 < r1.accepted_tokens <= r1.drafted_tokens
    assert r1.decode_steps < r1.completion_tokens - 1
    assert r0.drafted_tokens == 0 and r0.decode_steps == r0.completion_tokens - 1


def test_a_draft_that_always_agrees_is_accepted_whole(one_thread: None) -> None:  # noqa: F811
    e = _load(stories_meta(), max_seq_len=256)
    e.load_draft(stories_meta(), config=SpecConfig(draft_tokens=4))  # the same float32 model
    _, r = _run(e, max_new_tokens=81)
    assert r.accepted_tokens == r.drafted_tokens > 0
    assert r.tokens_per_step == pytest.approx(5.0)  # 4 drafts + 1 bonus a pass


@pytest.mark.parametrize("which", ["lookup", "drafted"])
def test_end_of_context_stop_strings_and_stop_ids(plain: Engine, which: str,
                                                  request: pytest.FixtureRequest,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    spec: Engine = request.getfixturevalue(which)
    # The end of the context inside a run: both stop where the context ends, with equal tokens.
    for e in (plain, spec):
        e.ensure_context(512)
    long = PROMPT + " there was" * 140  # about 425 tokens: the context ends mid-reply
    text0, r0 = _run(plain, long, max_new_tokens=300)
    text1, r1 = _run(spec, long, max_new_tokens=300)
    assert r0.finish_reason == r1.finish_reason == "context"
    assert r1.token_ids == r0.token_ids and r1.prompt_tokens + r1.completion_tokens == 512
    # A stop string the reply reaches: the same text before it.
    stop = "didn't know"
    text0, r0 = _run(plain, max_new_tokens=300, stop=[stop])
    text1, r1 = _run(spec, max_new_tokens=300, stop=[stop])
    assert r0.finish_reason == r1.finish_reason == "stop" and text1 == text0
    # A stop id (the id of " park") in the middle of the reply.
    park = plain.tokenizer.encode(" park", bos=False)[-1]
    for e in (plain, spec):
        monkeypatch.setattr(e.tokenizer, "stop_ids", e.tokenizer.stop_ids | {park})
    text0, r0 = _run(plain, max_new_tokens=300)
    text1, r1 = _run(spec, max_new_tokens=300)
    assert r0.finish_reason == r1.finish_reason == "stop"
    assert r1.token_ids == r0.token_ids and r1.completion_tokens == r0.completion_tokens


def test_batched_speculative_rows_equal_each_alone(lookup: Engine) -> None:
    prompts = [PROMPT, "The little dog"]
    alone = [_run(lookup, p, max_new_tokens=120)[1].token_ids for p in prompts]
    tickets = [lookup.submit(Request(lookup.encode_prompt(p), GREEDY, 120)) for p in prompts]
    results = {}
    while len(results) < 2:
        lookup.scheduler.step()
        for i, t in enumerate(tickets):
            while t.events:
                ev = t.events.popleft()
                if hasattr(ev, "finish_reason"):
                    results[i] = ev
    assert [results[i].token_ids for i in range(2)] == alone
    assert all(r.accepted_tokens > 0 for r in results.values())


def test_smollm2_float32_with_int4_draft_and_with_lookup(one_thread: None) -> None:  # noqa: F811
    """SmolLM2 in float32, drafted for by itself stored as int4, then by prompt lookup: the
    plain greedy tokens."""
    path = require_default_model()
    target = Engine.load(path, device="cpu", dtype="float32", quantize="none", max_seq_len=256)
    prompt = target.chat_format.encode_dialog([{"role": "user", "content": "Name three colours."}])
    plain_ids = [ev.id for ev in target.token_events(prompt, max_new_tokens=48)]
    target.load_draft(path, config=SpecConfig(draft_tokens=4))  # its stored Q4_1: int4
    ids = [ev.id for ev in target.token_events(prompt, max_new_tokens=48)]
    assert ids == plain_ids
    spec = target.speculator
    assert spec is not None and spec.drafted > 0 and spec.accepted / spec.drafted > 0.5
    # Prompt lookup on a task whose answer copies its input, same model in float32.
    target.speculate(SpecConfig(draft_tokens=4, lookup=3))
    code = "def add(a, b):\n    total = a + b\n    return total\n\n\ndef twice(x):\n    return add(x, x)\n"
    prompt = target.chat_format.encode_dialog([{"role": "user", "content": (
        "Repeat this code exactly, adding a docstring to each function:\n\n" + code)}])
    target.scheduler.speculator = None
    plain_ids = [ev.id for ev in target.token_events(prompt, max_new_tokens=64)]
    target.speculate(SpecConfig(draft_tokens=4, lookup=3))
    ids = [ev.id for ev in target.token_events(prompt, max_new_tokens=64)]
    assert ids == plain_ids
    spec = target.speculator
    assert spec is not None and spec.accepted > 10


# -- the sampled accept/reject rule ------------------------------------------------------------

def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts under probs (cells with expected < 5 pooled)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("draft_kind", ["model", "lookup"])
def test_sampled_tokens_follow_the_targets_distribution(plain: Engine, draft_kind: str) -> None:
    """The first token after a drafted position (kept draft or residual draw) is distributed as
    the target's filtered p, whatever the draft's q: chi-square over seeded samples."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    ids = plain.encode_prompt("Once upon a time, there was a")
    slot = plain.cache.acquire(ids, "test")
    assert slot is not None
    plain.cache.truncate(slot, 0)
    target_logits = plain.runner.run([Write.last(slot, ids)])[0]
    plain.cache.release(slot, "test")
    # A draft distribution unlike p: a flattened, shifted version of it.
    draft_logits = 0.5 * target_logits.roll(3)
    p = logits_to_probs(target_logits, temperature=1.0)
    q = logits_to_probs(draft_logits, temperature=1.0)
    logits = torch.stack([target_logits, target_logits])  # after the row's token, after d
    gen = torch.Generator().manual_seed(1234)
    n = 20000
    counts = torch.zeros_like(p, dtype=torch.float64)
    if draft_kind == "model":
        drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    else:  # a lookup draft: always the same token, proposed with certainty
        drafts = [int(torch.argsort(p, descending=True)[1])] * n
    for d in drafts:
        draft = Draft([d], q.view(1, -1) if draft_kind == "model" else None)
        kept, nxt = accept(logits, draft, params, gen)
        counts[d if kept else nxt] += 1
    assert _chi_square_p(counts, p.double()) > 1e-3


def test_greedy_accept_keeps_the_run_up_to_the_first_disagreement() -> None:
    logits = torch.full((4, 10), -1.0)
    for i, best in enumerate([3, 5, 7, 2]):
        logits[i, best] = 1.0
    assert accept(logits, Draft([3, 5, 7]), GREEDY, None) == (3, 2)  # all kept, then a bonus
    assert accept(logits, Draft([3, 6, 7]), GREEDY, None) == (1, 5)  # the correction
    assert accept(logits[:1], Draft([]), GREEDY, None) == (0, 3)


# -- drafters and adaptation -------------------------------------------------------------------

def test_prompt_lookup_proposes_the_latest_continuation_of_the_longest_match() -> None:
    idx = _NgramIndex(3)
    idx.extend([1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3])
    assert idx.propose(3) == [4, 9, 2]  # "1 2 3" (3 tokens) beats the later "2 3" (2)
    idx = _NgramIndex(3)
    idx.extend([7, 2, 3, 4, 9, 8, 2, 3])
    assert idx.propose(2) == [4, 9]  # "8 2 3" is new; "2 3" continues with 4 9
    idx = _NgramIndex(1)
    idx.extend([5, 1, 6, 1, 7, 1])
    assert idx.propose(2) == [7, 1]  # the latest earlier "1"
    idx.extend([5, 1, 6, 1, 7, 1, 6])  # the index grows with the text
    assert idx.propose(9) == [1, 7, 1, 6]
    idx = _NgramIndex(2)
    idx.extend([1, 2])
    assert idx.propose(3) == []


def test_adaptive_draft_length_and_pause() -> None:
    """A draft model's rows back off fast (its drafts cost passes); lookup's more slowly."""
    spec = Speculator(SpecConfig(draft_tokens=4), DraftModel(None, None))  # type: ignore[arg-type]
    state = RowState(k=4)
    spec.update(state, 4, 1)
    assert state.k == 3
    spec.update(state, 3, 3)
    assert state.k == 4
    spec.update(state, 4, 0)  # nothing kept: one token at a time from now
    assert state.k == 1
    for _ in range(3):  # four verifications in a row keeping nothing: a pause
        spec.update(state, state.k, 0)
    assert state.k == 1 and state.paused == 4
    assert [spec.wants(state) for _ in range(5)] == [False] * 4 + [True]
    spec.update(state, 1, 0)  # the probe after the pause keeps nothing: a longer pause
    assert state.paused == 8
    spec.update(state, 1, 1)  # an acceptance ends the run of misses
    assert state.misses == 0 and state.pause == 4
    assert spec.drafted == 4 + 3 + 4 + 3 + 1 + 1 and spec.accepted == 5
    lookup = Speculator(SpecConfig(draft_tokens=4, lookup=2))
    state = RowState(k=4)
    for k in (4, 3, 2, 1):  # misses shorten the draft one token at a time, then a pause
        assert state.k == k
        lookup.update(state, k, 0)
    assert state.paused == 4 and state.misses == 0
    lookup.update(state, 1, 0)
    assert state.paused == 4  # lookup is free: a whole run of misses again before the next


def test_config_and_vocabulary_checks(plain: Engine) -> None:
    with pytest.raises(InvalidArgumentError, match="--draft-tokens"):
        SpecConfig(draft_tokens=0)
    with pytest.raises(InvalidArgumentError, match="--lookup"):
        SpecConfig(lookup=99)
    other = _load(stories_meta(), max_seq_len=64)
    other.args = type(other.args)(**{**other.args.__dict__, "vocab_size": 513})
    with pytest.raises(InvalidArgumentError, match="513 tokens but the target's has 512"):
        plain.speculate(SpecConfig(), other)


def test_requests_with_logits_processors_or_logprobs_do_not_speculate(lookup: Engine) -> None:
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.3)
    _, r = _run(lookup, max_new_tokens=40, sampling=params)
    assert r.drafted_tokens == 0 and r.decode_steps == r.completion_tokens - 1
    _, r = _run(lookup, max_new_tokens=40, logprobs=True)
    assert r.drafted_tokens == 0


# -- the CLI -----------------------------------------------------------------------------------

def test_cli_complete_with_lookup_and_draft_model_prints_the_plain_text() -> None:
    base = ("complete", "-m", str(stories_meta()), "-p", PROMPT, "-t", "0", "-n", "80",
            "--dtype", "float32", "--no-compile", "-q")
    plain = run_cli(*base)
    assert plain.returncode == 0, plain.stderr
    for extra in (("--lookup", "3"), ("--draft-model", str(stories_meta()), "--draft-tokens", "3")):
        r = run_cli(*base, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout == plain.stdout


@pytest.mark.parametrize("args, message", [
    (("--lookup", "3", "--draft-model", "x"), "--draft-model or --lookup, not both"),
    (("--draft-tokens", "3"), "--draft-tokens needs --draft-model or --lookup"),
    (("--lookup", "0"), "--lookup must be between 1 and"),
    (("--draft-tokens", "99", "--lookup", "2"), "--draft-tokens must be between 1 and 32"),
])
def test_cli_bad_speculation_flags_are_one_line(args: tuple[str, ...], message: str) -> None:
    r = run_cli("complete", "-m", str(stories_meta()), "-p", "x", *args)
    assert r.returncode == 1
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_draft_model_with_another_vocabulary_is_one_line() -> None:
    r = run_cli("complete", "-m", str(stories_meta()), "-p", "x", "--draft-model",
                str(require_default_model()))
    assert r.returncode == 1
    assert "49152 tokens but the target's has 512" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bench_reports_acceptance_and_speed_up() -> None:
    r = run_cli("bench", "--tokens-per-sec", "-m", str(stories_meta()), "--lookup", "3",
                "--prompt-tokens", "16", "--gen-tokens", "48", "--repetitions", "1",
                "--no-compile", "--json")
    assert r.returncode == 0, r.stderr
    import json

    spec = json.loads(r.stdout)["speculative"]
    assert spec["kind"] == "prompt lookup" and spec["draft_tokens"] == 4
    assert 0 <= spec["acceptance"] <= 1 and spec["tokens_per_step"] >= 1.0
    assert spec["plain_tok_s"]["mean"] > 0 and spec["speedup"] > 0
    assert math.isclose(spec["acceptance"] * spec["drafted"], spec["accepted"])


def test_draft_model_rows_have_their_own_slots(drafted: Engine) -> None:
    draft = drafted.speculator.draft  # type: ignore[union-attr]
    assert isinstance(draft, DraftModel) and len(draft.cache) == len(drafted.cache)
    _run(drafted, max_new_tokens=30)
    assert draft.cache.free == len(draft.cache)  # released with the request
    # The draft slot holds a prefix of what the target's slot holds (rejections rolled back).
    target_ids = max((s.ids for s in drafted.cache.slots), key=len)
    draft_ids = max((s.ids for s in draft.cache.slots), key=len)
    assert target_ids[:len(draft_ids)] == draft_ids[:len(target_ids)]


def test_server_with_prompt_lookup_answers_as_plain_decoding(lookup: Engine, plain: Engine) -> None:
    """Served requests speculate (several at once share verification passes) and answer
    exactly what plain greedy decoding gives."""
    import concurrent.futures
    import urllib.request

    openai = pytest.importorskip("openai")
    from server_util import running_server

    prompts = [PROMPT, "The little dog", "Lily and Tom"]
    expected = [_run(plain, p, max_new_tokens=60)[0] for p in prompts]
    with running_server(lookup) as base:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)

        def ask(prompt: str) -> str:
            r = client.completions.create(model="x", prompt=prompt, max_tokens=60, temperature=0)
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the engine has 2 slots
            answers = list(pool.map(ask, prompts))
        with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=10) as r:
            health = json.load(r)
    assert answers == expected
    spec = health["speculative"]
    assert spec["kind"] == "prompt lookup" and 0 < spec["accepted"] <= spec["drafted"]
    assert spec["verify_passes"] > 0


@pytest.mark.slow
def test_compiled_target_and_draft_in_one_process(plain: Engine) -> None:
    """A compiled target (float32) and its compiled draft model (int8, other modules) each run
    their own graphs (they share the traced function: a graph of one on the weights of the
    other was a KeyError) and give the plain greedy tokens."""
    target = _load(stories_meta(), max_seq_len=256, compile=True)
    try:
        target.load_draft(stories_meta(), config=SpecConfig(draft_tokens=4), quantize="int8")
        target.wait_compiled()
        assert target.runner.compiled_ready and target.draft.runner.compiled_ready  # type: ignore[union-attr]
        _, expect = _run(plain, max_new_tokens=60)
        _, r = _run(target, max_new_tokens=60)  # the compiled graphs take over here
        assert target.compiled_in_use and target.speculator.draft.use_compiled  # type: ignore[union-attr]
        assert r.token_ids == expect.token_ids and r.accepted_tokens > 0
        # Verification rows of every length (the adaptive draft length varies them) and
        # positions run the one verification graph of their bucket: no recompiles.
        calls = []
        verify = target.runner._verify
        target.runner._verify = lambda *a: calls.append(a) or verify(*a)  # type: ignore[misc]
        with torch._dynamo.config.patch(error_on_recompile=True):
            _, r = _run(target, "The little dog", max_new_tokens=60)
        target.runner._verify = verify
        lengths = {s.length for _, spans in calls for s in spans}
        assert len(calls) > 5 and len(lengths) >= 2
        _, expect = _run(plain, "The little dog", max_new_tokens=60)
        assert r.token_ids == expect.token_ids
    finally:
        torch._dynamo.reset()
