"""`llamarun serve`: the OpenAI API driven by the real `openai` client, on stories260K (and the
default SmolLM2 model), against the library's own output for the same input."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from llamarun.engine import Engine
from llamarun.sampling import SamplingParams
from engine_util import REPO, one_thread, stories_meta  # noqa: F401
from fixtures_util import require_default_model
from server_util import running_server

openai = pytest.importorskip("openai")

GREEDY = SamplingParams.greedy()
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Tom went to the park", "One day, a bird",
           "The sun was", "Ben had a red ball", "Mom said", "In the big forest"]


@pytest.fixture(scope="module")
def served(one_thread: None) -> Engine:
    return Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=256, slots=8)


@pytest.fixture(scope="module")
def reference(one_thread: None) -> Engine:
    """The same model with one slot, driven directly through the library."""
    return Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=256)


@pytest.fixture(scope="module")
def url(served: Engine) -> Iterator[str]:
    with running_server(served) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def complete_ids(engine: Engine, prompt: str, n: int) -> tuple[str, int]:
    gen = engine.complete(prompt, sampling=GREEDY, max_new_tokens=n)
    list(gen)
    return gen.result.text, gen.result.completion_tokens


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.load(r)


def test_models_and_health(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == ["test-model"]
    h = health(url)
    assert h["status"] == "ok" and h["slots"] == 8 and h["active"] == 0


def test_completion_equals_library_greedy(client: openai.OpenAI, reference: Engine) -> None:
    r = client.completions.create(model="x", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    text, n = complete_ids(reference, PROMPTS[0], 24)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference.encode_prompt(PROMPTS[0]))
    assert r.usage.completion_tokens == n == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_chat_equals_library_session(client: openai.OpenAI, reference: Engine) -> None:
    messages = [{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": "Tell me about a dog."}]
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=20, temperature=0)
    session = reference.chat(system="You tell stories.")
    gen = session.send("Tell me about a dog.", sampling=GREEDY, max_new_tokens=20)
    list(gen)
    assert r.choices[0].message.content == gen.result.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(reference.chat_format.encode_dialog(messages))


def test_streams_equal_the_whole_answers(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0)
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0,
            stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content and finish == "length"
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens == 16
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True) if c.choices)
    assert text == client.completions.create(model="x", prompt=PROMPTS[1], max_tokens=16,
                                             temperature=0).choices[0].text


def test_stop_strings_echo_and_seeds(client: openai.OpenAI, reference: Engine) -> None:
    full, _ = complete_ids(reference, PROMPTS[0], 24)  # ", there was a little girl named Lily..."
    r = client.completions.create(model="x", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                  stop=["girl"])
    assert r.choices[0].text == full[:full.index("girl")] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="x", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                  echo=True)
    assert r.choices[0].text.startswith(PROMPTS[0] + ",")

    def sampled(seed: int) -> str:
        return client.completions.create(model="x", prompt=PROMPTS[0], max_tokens=24,
                                         temperature=1.0, seed=seed).choices[0].text
    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy: the top token
    c = client.completions.create(model="x", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"n": 2}, 400, "n"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10**6}, 400, "max_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 413, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
])
def test_errors_have_openais_shape(client: openai.OpenAI, kwargs: dict, status: int,
                                   param: str) -> None:
    args = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status
    body = e.value.body
    assert isinstance(body, dict) and body["message"] and body["param"] == param


def test_api_key_and_full_queue(served: Engine) -> None:
    with running_server(served, api_key="s3cret", max_queue=0) as base:
        bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "test-model"
        with pytest.raises(openai.RateLimitError) as e2:  # no request may wait
            good.completions.create(model="x", prompt="Hi", max_tokens=2)
        assert e2.value.status_code == 429
        assert health(base)["status"] == "ok"  # no key needed


def test_disconnect_frees_the_slot(client: openai.OpenAI, url: str) -> None:
    stream = client.completions.create(model="x", prompt=PROMPTS[2], max_tokens=200,
                                       temperature=0.8, seed=1, stream=True)
    next(iter(stream))
    assert health(url)["active"] == 1
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while health(url)["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(url)["active"] == 0


def test_concurrent_greedy_requests_equal_each_alone(client: openai.OpenAI, url: str,
                                                     reference: Engine) -> None:
    """Batch invariance: 8 requests decoded together give exactly the tokens of each alone.
    (120 tokens each: this tiny model decodes 40 in a few milliseconds, about the time the 8
    requests take to arrive, so on a busy machine they overlapped too little to batch well.)"""
    def ask(prompt: str) -> tuple[str, int]:
        r = client.completions.create(model="x", prompt=prompt, max_tokens=120, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(p) for p in PROMPTS]
    before = health(url)
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    after = health(url)
    assert together == alone
    assert [t for t, _ in alone] == [complete_ids(reference, p, 120)[0] for p in PROMPTS]
    # They were decoded together: several rows per step on average.
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_rows"] - before["decoded_rows"]
    assert rows == sum(n - 1 for _, n in together) and rows / steps > 3


def test_requests_share_a_cached_prefix(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You are a storyteller who likes dogs and cats."}
    first = client.chat.completions.create(
        model="x", messages=[system, {"role": "user", "content": "A dog"}], max_tokens=3,
        temperature=0)
    second = client.chat.completions.create(
        model="x", messages=[system, {"role": "user", "content": "A cat"}], max_tokens=3,
        temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 10  # the system prompt, at least


def test_default_model_chat_equals_library_session(one_thread: None) -> None:
    path = require_default_model()
    served = Engine.load(path, device="cpu", max_seq_len=512, slots=2)
    reference = Engine.load(path, device="cpu", max_seq_len=512)
    question = "What is the capital of France?"
    with running_server(served) as base:
        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": question}],
                                      max_tokens=16, temperature=0)
    gen = reference.chat().send(question, sampling=GREEDY, max_new_tokens=16)
    list(gen)
    assert r.choices[0].message.content == gen.result.text and gen.result.token_ids
    assert r.choices[0].finish_reason == gen.result.finish_reason


def test_cli_serve_answers_and_stops_on_ctrl_c(one_thread: None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LLAMARUN_MODEL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamarun", "serve", "-m", str(stories_meta()), "--port", "0",
         "--dtype", "float32", "--max-concurrency", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "serving" not in line:
            line = proc.stderr.readline()
        assert "serving" in line and "(2 slots of" in line, line
        base = line.split(" at ")[1].split()[0]
        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=60)
        r = c.completions.create(model="x", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert r.choices[0].text.startswith(", there was a little girl")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "server stopped" in rest
    finally:
        proc.kill()
        proc.wait()


def test_cli_serve_refuses_bad_flags_in_one_line() -> None:
    from engine_util import run_cli

    r = run_cli("serve", "-m", str(stories_meta()), "--max-concurrency", "0")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: --max-concurrency must be at least 1, got 0"]
