"""`serve --tp N` when a rank dies: open streams end with an error event in OpenAI's shape,
requests in flight and new ones get 503, and the job ends with one line naming the rank."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from llamarun import parallel
from llamarun.engine import Engine
from llamarun.parallel import LOST_MESSAGE, LeaderRunner, PeerLost
from llamarun.server import create_app, listen, make_server, refuse_requests
from engine_util import REPO, engine, one_thread, stories_meta  # noqa: F401
from test_cli_tp import KILLED, env, ranks_of

# What gloo raises on rank 0 when a peer's process is gone.
RESET = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:31649: "
         "Connection reset by peer. This is typically caused by a remote worker hanging")
LOST = {"error": {"message": LOST_MESSAGE, "type": "server_error", "param": None,
                  "code": "shutting_down"}}


class Group:
    """Stands in for the control group's broadcast: the first `ok` passes go out, then every
    broadcast fails as gloo's does when the other rank is gone."""

    def __init__(self, ok: int) -> None:
        self.ok, self.sent = ok, 0

    def broadcast(self, obj: object, src: int = 0, group: Any = None) -> object:
        self.sent += 1
        if self.sent > self.ok:
            raise RuntimeError(RESET)
        return obj


def test_a_lost_rank_breaks_the_leader_once(monkeypatch: pytest.MonkeyPatch) -> None:
    group = Group(ok=1)
    monkeypatch.setattr(parallel, "broadcast_object", group.broadcast)
    runs: list[object] = []
    inner = SimpleNamespace(device="cpu", cache=None, max_seq_len=8, compiled_ready=False,
                            run=lambda writes, compiled: runs.append(writes) or "logits")
    seen: list[PeerLost] = []
    leader = LeaderRunner(inner, None, on_lost=seen.append)
    assert leader.run([]) == "logits"
    with pytest.raises(PeerLost) as first:
        leader.run([])
    assert str(first.value) == LOST_MESSAGE and str(first.value.__cause__) == RESET
    with pytest.raises(PeerLost):  # nothing more goes into the broken group
        leader.run([])
    leader.close()
    assert group.sent == 2 and len(runs) == 1
    assert seen == [first.value] and str(leader.lost) == RESET


def test_the_leaders_own_errors_do_not_break_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "broadcast_object", Group(ok=10).broadcast)

    def run(writes: object, compiled: bool) -> object:
        raise ValueError("a write needs at least one token")

    inner = SimpleNamespace(device="cpu", cache=None, run=run)
    leader = LeaderRunner(inner, None, on_lost=lambda e: pytest.fail("not a lost rank"))
    with pytest.raises(ValueError):
        leader.run([])
    assert leader.lost is None


@contextmanager
def leader_server(engine: Engine, group: Group) -> Iterator[tuple[int, list[PeerLost]]]:
    """Serve `engine` in this process as `serve --tp` rank 0 does, over `group`; yields the
    port and the PeerLost errors its on_lost saw."""
    app = create_app(engine, model_id="test-model")
    server = make_server(app)
    seen: list[PeerLost] = []

    def lost(e: PeerLost) -> None:  # what serve does, but the test stops the server itself
        seen.append(e)
        refuse_requests(app, str(e))

    runner = engine.scheduler.runner
    engine.scheduler.runner = LeaderRunner(runner, None, on_lost=lost)
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1], seen
    finally:
        server.should_exit = True
        thread.join(30)
        engine.scheduler.runner = runner


def post(port: int, path: str, body: dict[str, Any]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream, up to its end."""
    for line in response:
        if line.startswith(b"data: "):
            yield line[6:].decode().strip()


def test_a_lost_rank_ends_streams_with_an_error_and_refuses_requests(
        monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    group = Group(ok=4)  # the prefill and three decode passes
    monkeypatch.setattr(parallel, "broadcast_object", group.broadcast)
    with leader_server(engine, group) as (port, seen):
        stream = post(port, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 50,
                                                "temperature": 0, "stream": True})
        assert stream.status == 200
        data = list(events(stream))
        tokens = [json.loads(d)["choices"][0] for d in data[:-1]]
        assert tokens and all(t["text"] and t["finish_reason"] is None for t in tokens)
        assert json.loads(data[-1]) == LOST  # its last event, and no [DONE]
        assert len(seen) == 1 and group.sent == 5
        # New requests are refused before they reach the broken group.
        for path, body in [("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                     "stream": True})]:
            r = post(port, path, body)
            assert (r.status, json.loads(r.read())) == (503, LOST)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        assert group.sent == 5


def test_a_request_running_when_a_rank_is_lost_gets_503(
        monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    group = Group(ok=2)
    monkeypatch.setattr(parallel, "broadcast_object", group.broadcast)
    with leader_server(engine, group) as (port, seen):
        r = post(port, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 50,
                                           "temperature": 0})
        assert (r.status, json.loads(r.read())) == (503, LOST)
        assert len(seen) == 1


# -- a real job --------------------------------------------------------------------------------

@contextmanager
def tp_server() -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """`llamarun --tp 2 serve` on stories260K: (the launcher, its port, its stderr lines so far,
    filled by a thread). Every process of the job is killed at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamarun", "--tp", "2", "serve", "-m", str(stories_meta()),
         "--dtype", "float32", "--port", "0", "--max-concurrency", "2", "--no-compile"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    lines: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 90
        while not any("serving" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(lines)
            time.sleep(0.05)
        ranks = ranks_of(proc.pid)
        address = next(line for line in lines if "serving" in line).split(" at ")[1].split()[0]
        yield proc, int(address.split(":")[2].split("/")[0]), lines
        reader.join(10)
    finally:
        for pid in [proc.pid, *ranks.values()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_while_streaming_ends_the_server_in_one_line(victim: int) -> None:
    with tp_server() as (proc, port, lines):
        ranks = ranks_of(proc.pid)
        assert sorted(ranks) == [0, 1]
        stream = post(port, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400,
                                                "temperature": 0, "stream": True})
        assert stream.status == 200
        data = events(stream)
        assert json.loads(next(data))["choices"][0]["text"]  # tokens are coming
        os.kill(ranks[victim], signal.SIGKILL)
        killed = time.monotonic()
        try:
            rest = list(data)
        except (http.client.IncompleteRead, ConnectionError):  # rank 0 (the server) is gone
            rest = []
        assert "[DONE]" not in rest
        if victim == 1:
            assert json.loads(rest[-1]) == LOST  # the stream's last event
        assert proc.wait(60) == 128 + signal.SIGKILL
        assert time.monotonic() - killed < 30
        for pid in ranks.values():  # no rank outlives the job
            assert not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid)
    assert lines[-1] == f"error: rank {victim} was killed by SIGKILL {KILLED}", lines
    assert not any("Traceback" in line or "gloo" in line for line in lines), lines


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return "Z"
