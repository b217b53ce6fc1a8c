"""`llamarun serve` against hostile and careless clients (issue 18): bodies without a length,
slow and idle connections, many sockets from one address, malformed requests, text that is not
Unicode, degenerate sampling values, a non-ASCII key, shutdown, and the per-request log line.

Everything runs on 127.0.0.1 with short limits, each test bounded to a few seconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from llamarun.engine import Engine
from llamarun.errors import InvalidArgumentError
from llamarun.sampling import SamplingParams, apply_repeat_penalty, logits_to_probs, sample
from llamarun.server import MAX_BODY_BYTES, ConnectionLimits, create_app, listen, make_server
from engine_util import REPO, one_thread, run_cli, stories_meta  # noqa: F401

FAST = ConnectionLimits(header_timeout=1.0, per_client=16, total=64, linger=0.5)


def load() -> Engine:
    return Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=256, slots=2)


@pytest.fixture(scope="module")
def engine(one_thread: None) -> Engine:
    return load()


@contextmanager
def serving(engine: Engine | None = None, limits: ConnectionLimits = FAST,
            **app_options: Any) -> Iterator[Any]:
    """A server in a thread on a free loopback port; yields it with .port set. Each server
    gets an engine of its own unless given one (an engine's scheduler serves one server)."""
    engine = engine or load()
    app_options.setdefault("body_timeout", 1.0)
    server = make_server(create_app(engine, model_id="test-model", **app_options), limits=limits)
    sock = listen("127.0.0.1", 0)
    server.port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Any]:
    with serving(engine) as s:
        yield s


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read from `s`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    return status, headers, rest[:length]


def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(port) as s:
        s.sendall(raw)
        return read_response(s)


def post(path: str, body: bytes, *, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


@contextmanager
def logged(*names: str) -> Iterator[list[logging.LogRecord]]:
    """The records of these loggers from INFO up, caught by a handler on the loggers themselves
    (the CLI turns off propagation to the root, where caplog listens)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes `s` (EOF or reset) within `seconds`, ignoring data it sends."""
    s.settimeout(0.1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if s.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def assert_openai_error(status: int, body: bytes, expected: int) -> dict:
    assert status == expected, body
    error = json.loads(body)
    assert list(error) == ["error"]
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["message"]
    param = error["error"]["param"]
    assert param is None or (isinstance(param, str) and not param.isdigit())
    return error["error"]


# -- bodies ------------------------------------------------------------------------------------

def test_chunked_body_stops_at_the_limit(server: Any) -> None:
    """A body with no Content-Length is read to MAX_BODY_BYTES, then refused before it ends."""
    with connect(server.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/json\r\n\r\n")
        piece = b"x" * 65536
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        start = time.monotonic()
        sent = 0
        try:
            while sent <= MAX_BODY_BYTES + len(piece):  # never the last chunk: the body never ends
                s.sendall(chunk)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = read_response(s)
        assert time.monotonic() - start < 5
        assert assert_openai_error(status, body, 413)["code"] == "body_too_large"
        assert closed_within(s, 3)  # the rest of the body is not read: the connection ends


def test_declared_length_over_the_limit_is_refused_before_reading(server: Any) -> None:
    with connect(server.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        status, _, body = read_response(s)
        assert assert_openai_error(status, body, 413)["code"] == "body_too_large"


def test_body_that_stops_arriving_gets_408(server: Any) -> None:
    with connect(server.port) as s:
        start = time.monotonic()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pr")
        status, _, body = read_response(s)
        assert 0.9 < time.monotonic() - start < 4  # body_timeout is 1 s here
        assert assert_openai_error(status, body, 408)["code"] == "body_timeout"
        assert closed_within(s, 3)


def test_client_gone_mid_body_is_logged_as_499_without_a_traceback(
        server: Any) -> None:
    with logged("llamarun.access", "llamarun.server", "llamarun.server_limits") as records:
        with connect(server.port) as s:
            port = s.getsockname()[1]
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.2)

        def mine() -> list[logging.LogRecord]:
            # every record but other connections' access lines (an earlier test's 408 can be
            # logged after that test ended: seen on CI)
            return [r for r in records
                    if r.name != "llamarun.access" or f":{port} " in r.getMessage()]
        deadline = time.monotonic() + 2
        while not mine() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # anything logged after the access line would show too
    assert [r.levelno for r in mine()] == [logging.INFO]
    assert '"POST /v1/completions" 499' in mine()[0].getMessage()


def test_missing_key_is_refused_before_the_body(one_thread: None) -> None:
    with serving(api_key="s3cret", body_timeout=30) as srv:
        for framing in (b"Content-Length: 1000", b"Transfer-Encoding: chunked"):
            with connect(srv.port) as s:
                start = time.monotonic()
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % framing)
                status, _, body = read_response(s)  # no body was sent: it is not waited for
                assert time.monotonic() - start < 2
                assert assert_openai_error(status, body, 401)["code"] == "invalid_api_key"
        ok = request(srv.port, post("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}',
                                    extra="Authorization: Bearer s3cret\r\n"))
        assert ok[0] == 200


# -- connections -------------------------------------------------------------------------------

def test_idle_and_slow_connections_are_closed(server: Any) -> None:
    idle = connect(server.port)
    slow = connect(server.port)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    try:
        for i in range(20):  # a header byte every 0.2 s: the head still never completes
            slow.sendall(b"X-a: b\r\n"[i % 8:i % 8 + 1])
            time.sleep(0.2)
    except OSError:  # closed by the server (broken pipe, reset)
        pass
    assert closed_within(slow, 1) and time.monotonic() - start < 2.5  # header_timeout is 1 s
    assert closed_within(idle, 1)
    # A kept-alive connection gets the same time for its next request head.
    with connect(server.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 200
        assert closed_within(s, 2.5)
    idle.close()
    slow.close()


def test_idle_sockets_do_not_lock_out_a_client(server: Any) -> None:
    """200 idle sockets from one address: the newest per_client stay, a real request still
    gets through at once, and nothing waits for the header timeout."""
    sockets = [connect(server.port) for _ in range(200)]
    try:
        start = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as r:
            assert r.status == 200 and json.load(r)["status"] == "ok"
        assert time.monotonic() - start < 0.9  # before the 1 s header timeout closes any
        still_open = 0
        for s in sockets:
            s.setblocking(False)
            try:
                still_open += s.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
        assert still_open <= FAST.per_client
    finally:
        for s in sockets:
            s.close()


def test_busy_connections_are_not_evicted(one_thread: None) -> None:
    """When every connection of an address is in the middle of a request, a new one gets 503."""
    limits = ConnectionLimits(header_timeout=5.0, per_client=2, total=64, linger=0.5)
    with serving(limits=limits, body_timeout=2.0) as srv:
        busy = [connect(srv.port) for _ in range(2)]
        for s in busy:  # heads in, bodies never: both are running requests
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
        time.sleep(0.2)
        status, _, body = request(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert assert_openai_error(status, body, 503)["code"] == "too_many_connections"
        for s in busy:
            assert read_response(s)[0] == 408
            s.close()
        time.sleep(0.2)
        assert request(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
    (b"GET /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    (b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    (post("/v1/completions", b"{prompt: 1}"), 400, "invalid_json"),
    (post("/v1/completions", b'{"prompt": "a"'), 400, "invalid_json"),
    (post("/v1/completions", b'{"prompt": "\xff\xfe"}'), 400, "invalid_json"),
    (post("/v1/completions", b""), 400, "invalid_json"),
    (post("/v1/completions", b'{"prompt": "Hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400,
     "invalid_json"),
    (post("/v1/completions", b'{"prompt": "Hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}"), 400,
     "invalid_json"),
    (post("/v1/chat/completions", b'[{"role": "user"}]'), 400, None),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid_http"),
])
def test_every_error_has_openais_shape(server: Any, raw: bytes, status: int,
                                       code: str | None) -> None:
    got, headers, body = request(server.port, raw)
    assert headers["content-type"].startswith("application/json")
    assert assert_openai_error(got, body, status)["code"] == code


def test_invalid_fields_name_the_field(server: Any) -> None:
    status, _, body = request(server.port, post("/v1/chat/completions",
                                                b'{"messages": [{"role": "user", "content": 5}]}'))
    assert assert_openai_error(status, body, 400)["param"].startswith("messages.0.content")
    status, _, body = request(server.port, post("/v1/completions",
                                                b'{"prompt": "Hi", "max_tokens": "many"}'))
    assert assert_openai_error(status, body, 400)["param"] == "max_tokens"


def test_prompt_token_ids_outside_the_vocabulary_are_refused(server: Any, engine: Engine) -> None:
    """A prompt of token ids is checked by Engine.check_ids: an id past the vocabulary (or
    negative) is a 400 naming it and the prompt field; ids inside it complete."""
    vocab = engine.args.vocab_size
    for bad in (vocab, -1):
        raw = json.dumps({"prompt": [1, bad], "max_tokens": 2}).encode()
        status, _, body = request(server.port, post("/v1/completions", raw))
        error = assert_openai_error(status, body, 400)
        assert error["param"] == "prompt" and f"token id {bad} " in error["message"]
    raw = json.dumps({"prompt": [1, vocab - 1], "max_tokens": 2}).encode()
    status, _, body = request(server.port, post("/v1/completions", raw))
    assert status == 200, body


@pytest.mark.parametrize("body", [
    {"prompt": "Once\ud800 upon", "max_tokens": 3, "echo": True},
    {"prompt": ["\udcff"], "max_tokens": 2, "stop": ["\ud800"]},
    {"prompt": "Hi", "max_tokens": 2, "stream": True, "stop": "\udfff"},
])
def test_lone_surrogates_become_replacement_characters(server: Any, body: dict) -> None:
    raw = json.dumps(body).encode()  # ensure_ascii: "\\ud800", as a browser's broken slice sends
    status, _, out = request(server.port, post("/v1/completions", raw))
    assert status == 200, out
    if body.get("echo"):
        assert json.loads(out)["choices"][0]["text"].startswith("Once\ufffd upon")


def test_chat_with_lone_surrogates(server: Any) -> None:
    raw = json.dumps({"messages": [{"role": "user", "content": "Hi \ud83d there"}],
                      "max_tokens": 2}).encode()
    status, _, out = request(server.port, post("/v1/chat/completions", raw))
    assert status == 200 and json.loads(out)["usage"]["prompt_tokens"] > 0


# -- the event loop ----------------------------------------------------------------------------

def test_tokenizing_does_not_block_other_requests(server: Any, engine: Engine,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding a prompt or rendering a dialog runs off the event loop: /health answers while
    a (here artificially) slow encode is under way."""
    real_prompt, real_dialog = engine.encode_prompt, engine.chat_format.encode_dialog

    def slow_prompt(text: str, **kw: Any) -> list[int]:
        time.sleep(1.5)
        return real_prompt(text, **kw)

    def slow_dialog(messages: Any) -> list[int]:
        time.sleep(1.5)
        return real_dialog(messages)

    monkeypatch.setattr(engine, "encode_prompt", slow_prompt)
    monkeypatch.setattr(engine.chat_format, "encode_dialog", slow_dialog)
    for path, body in [("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})]:
        slow = connect(server.port)
        slow.sendall(post(path, json.dumps(body).encode()))
        time.sleep(0.2)  # the slow encode has started
        start = time.monotonic()
        status, _, _ = request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and time.monotonic() - start < 0.8
        assert read_response(slow)[0] == 200
        slow.close()


def test_a_four_megabyte_prompt_does_not_stall_the_server(server: Any) -> None:
    """A ~4 MB prompt takes over a second to tokenize (then is refused: longer than the
    context); meanwhile the server answers others at once."""
    big = connect(server.port, timeout=30)
    big.sendall(post("/v1/completions", json.dumps(
        {"prompt": "word " * 800_000, "max_tokens": 2}).encode()))
    waits = []
    big.setblocking(False)
    while True:
        try:
            if big.recv(1, socket.MSG_PEEK):
                break
        except BlockingIOError:
            pass
        start = time.monotonic()
        assert request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.05)
    big.setblocking(True)
    status, _, body = read_response(big)
    big.close()
    assert assert_openai_error(status, body, 413)["code"] == "context_length_exceeded"
    assert len(waits) >= 5 and max(waits) < 0.5, waits


# -- sampling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-300, 0.7, 1e30, 1e300])
def test_extreme_temperatures_give_probabilities(temperature: float) -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)) * 8
    probs = logits_to_probs(logits, temperature=temperature, top_k=40, top_p=0.9, min_p=0.05)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    if temperature < 1e-20:  # all the mass on the most likely token
        assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and probs.amax(-1).eq(1).all()


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e30, 1e300])
def test_extreme_repeat_penalties_give_probabilities(penalty: float) -> None:
    logits = -torch.rand(2, 50, generator=torch.Generator().manual_seed(1)) - 0.1  # all < 0
    logits[0, 7] = 5.0
    penalised = apply_repeat_penalty(logits, torch.arange(50), penalty)  # every token seen
    assert torch.isfinite(penalised).all()
    for t in (1e-30, 0.8, 1e30):
        assert torch.isfinite(logits_to_probs(penalised, temperature=t)).all()
    params = SamplingParams(temperature=1.0, repeat_penalty=penalty, top_k=0, top_p=1.0, min_p=0)
    token = sample(logits, params, torch.Generator().manual_seed(0), recent=torch.arange(50))
    assert token.shape == (2,) and bool(((token >= 0) & (token < 50)).all())


def test_server_takes_degenerate_sampling_values(server: Any) -> None:
    def ask(**kw: Any) -> tuple[int, dict]:
        body = {"prompt": "Once upon a time", "max_tokens": 12, "seed": 3, **kw}
        status, _, out = request(server.port, post("/v1/completions", json.dumps(body).encode()))
        return status, json.loads(out)

    status, greedy = ask(temperature=0)
    assert status == 200
    for t in (1e-30, 1e-300):  # as good as greedy
        status, r = ask(temperature=t, top_k=0, top_p=1.0, min_p=0)
        assert status == 200 and r["choices"][0]["text"] == greedy["choices"][0]["text"]
    for kw in ({"temperature": 1e300}, {"repeat_penalty": 1e-300}, {"repeat_penalty": 1e300},
               {"top_p": 1e-300}, {"min_p": 1.0}):
        status, r = ask(**kw, logprobs=1)
        assert status == 200 and r["usage"]["completion_tokens"] > 0, (kw, r)
        logprobs = r["choices"][0]["logprobs"]["token_logprobs"]
        assert all(lp is not None and lp <= 0 for lp in logprobs)
    for kw, param in (({"temperature": 1e400}, "temperature"),  # 1e400 is JSON's inf
                      ({"repeat_penalty": 0}, "repeat_penalty"), ({"top_p": 0}, "top_p")):
        raw = json.dumps({"prompt": "Hi", **kw}).replace("Infinity", "1e400").encode()
        status, _, out = request(server.port, post("/v1/completions", raw))
        assert assert_openai_error(status, out, 400)["param"] == param


# -- keys, shutdown, logging -------------------------------------------------------------------

def test_a_non_ascii_key_is_refused_at_start(engine: Engine) -> None:
    with pytest.raises(InvalidArgumentError, match="ASCII"):
        create_app(engine, model_id="m", api_key="cl\u00e9")
    r = run_cli("serve", "-m", str(stories_meta()), "--api-key", "cl\u00e9", "--port", "0",
                timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: --api-key must be printable ASCII (clients send it in an HTTP header, which most "
        "of them cannot do with other characters)"]


def test_shutdown_finishes_running_requests_and_refuses_new_ones(one_thread: None) -> None:
    with serving() as srv:
        stream = connect(srv.port, timeout=30)
        stream.sendall(post("/v1/completions", json.dumps(
            {"prompt": "Once upon a time", "max_tokens": 150, "temperature": 0.8, "seed": 2,
             "stream": True}).encode()))
        assert stream.recv(65536).startswith(b"HTTP/1.1 200")
        kept = connect(srv.port)  # a kept-alive connection between requests
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept)[0] == 200
        srv.should_exit = True
        time.sleep(0.3)
        with pytest.raises(ConnectionRefusedError):  # the port is closed at once
            socket.create_connection(("127.0.0.1", srv.port), timeout=2)
        assert closed_within(kept, 2)  # idle connections are closed
        rest = b""
        while b"data: [DONE]" not in rest:  # the running stream still ends normally
            chunk = stream.recv(65536)
            assert chunk, rest[-300:]
            rest += chunk
        stream.close()
        kept.close()


def test_one_log_line_per_request(server: Any) -> None:
    with logged("llamarun.access") as records:
        status, _, out = request(server.port, post(
            "/v1/completions", b'{"prompt": "Once upon a time", "max_tokens": 5}'))
        assert status == 200
        request(server.port, b"GET /no%1b[2Jpe HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 2
        while len(records) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 2, lines
    usage = json.loads(out)["usage"]
    assert '"POST /v1/completions" 200' in lines[0]
    assert f"prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}" in lines[0]
    assert lines[0].startswith("127.0.0.1:") and lines[0].endswith("s")
    assert '"GET /no\\x1b[2Jpe" 404' in lines[1]  # no escape code reaches the console


def test_cli_logs_each_request_unless_quiet(one_thread: None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LLAMARUN_MODEL", None)
    for quiet in (False, True):
        args = [sys.executable, "-m", "llamarun", "serve", "-m", str(stories_meta()), "--port",
                "0", "--dtype", "float32", "--max-concurrency", "1"]
        args += ["--quiet"] if quiet else []
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                env=env, cwd=REPO)
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            while line and "serving" not in line:
                line = proc.stderr.readline()
            base = line.split(" at ")[1].split()[0]
            req = urllib.request.Request(base + "/completions", method="POST", data=json.dumps(
                {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}).encode())
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
            rest = proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
        logged = [x for x in rest.splitlines() if '"POST /v1/completions" 200' in x]
        if quiet:
            assert logged == [] and "server stopped" in rest
        else:
            assert len(logged) == 1 and "prompt=" in logged[0] and "completion=4" in logged[0], rest
