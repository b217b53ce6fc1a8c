"""`--tp N` failures: N checked against the model and the machine before any rank starts, and a
rank that dies named in one line (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_util import REPO, stories_meta
from llamarun.cli.distributed import PEER_LOST, check_world, failure_report
from llamarun.cli.options import ModelOptions
from llamarun.errors import InvalidArgumentError

KILLED = "(by a user, or by the system when memory ran out); the job stopped"


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    e.pop("LLAMARUN_MODEL", None)
    return e


@pytest.mark.parametrize(("codes", "logs", "expected"), [
    # rank 1 was killed; rank 0 was stopped by the agent (SIGTERM, our handler's 143) or lost it
    ({1: -9, 0: 143}, {}, (f"error: rank 1 was killed by SIGKILL {KILLED}", 137)),
    ({0: -9, 1: PEER_LOST}, {}, (f"error: rank 0 was killed by SIGKILL {KILLED}", 137)),
    ({1: -11, 0: -15}, {}, ("error: rank 1 was stopped by SIGSEGV (a crash); the job stopped", 139)),
    # rank 0 failed by itself: it has printed its own error line
    ({0: 1, 1: 1}, {1: "error: (rank 1) bad file\n"}, ("", 1)),
    # another rank failed by itself: its error lines, once
    ({1: 1, 0: 143}, {1: "error: (rank 1) x.pth: not a checkpoint\n"},
     ("error: (rank 1) x.pth: not a checkpoint", 1)),
    # ... or, without one, the last thing it wrote
    ({1: 3, 0: 143}, {1: "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"},
     ("error: rank 1 exited with status 3: RuntimeError: boom; the job stopped", 3)),
    ({1: 1, 0: 143}, {}, ("error: rank 1 exited with status 1 without a message; the job stopped", 1)),
    ({0: PEER_LOST, 1: PEER_LOST}, {},
     ("error: the ranks lost contact with each other (one stopped answering for "
      "$LLAMARUN_TP_TIMEOUT seconds, or its connection broke)", 1)),
])
def test_failure_report_names_the_rank_that_failed_first(
        codes: dict[int, int], logs: dict[int, str], expected: tuple[str, int]) -> None:
    assert failure_report(codes, logs) == expected


def test_memory_for_every_rank_is_checked_before_starting() -> None:
    opts = ModelOptions(model=str(stories_meta()), device="cpu", dtype="float32")
    check_world(2, opts, available=4 << 30)  # fits
    with pytest.raises(InvalidArgumentError) as e:
        check_world(2, opts, available=300 << 20)
    assert str(e.value).startswith("--tp 2 needs about ")
    assert "(2 processes of " in str(e.value) and "300.0 MiB available; use fewer processes" in str(e.value)


def test_more_ranks_than_cores_is_refused_before_starting() -> None:
    cpu = min(os.sched_getaffinity(0))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "llamarun", "--tp", "2", "complete", "-m",
                        str(stories_meta()), "-p", "x"], capture_output=True, text=True,
                       timeout=120, env=env(), cwd=REPO,
                       preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "error: --tp 2 needs a CPU core per process; this process may use 1"]
    assert time.monotonic() - start < 30  # no rank was started (each would load torch)


def test_a_bad_tp_timeout_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "llamarun", "--tp", "2", "info", "-m",
                        str(stories_meta())], capture_output=True, text=True, timeout=120,
                       env={**env(), "LLAMARUN_TP_TIMEOUT": "soon"}, cwd=REPO)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: LLAMARUN_TP_TIMEOUT must be a number of seconds from 1 to 2592000 (30 days), "
        "got 'soon'"]


def ranks_of(launcher: int) -> dict[int, int]:
    """RANK -> pid of the processes the launcher's agent started (read from /proc)."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == launcher:
            continue
        try:
            fields = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        values = dict(f.split(b"=", 1) for f in fields if b"=" in f)
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid")))
        if b"TORCHELASTIC_RUN_ID" in values and ppid == launcher:
            out[int(values[b"RANK"])] = int(entry.name)
    return out


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_is_named_in_one_line(victim: int) -> None:
    chat = subprocess.Popen(
        [sys.executable, "-m", "llamarun", "--tp", "2", "chat", "-m", str(stories_meta()),
         "-t", "0", "-n", "8", "--no-compile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    try:
        assert chat.stdin is not None and chat.stdout is not None
        chat.stdin.write("Hi\n")
        chat.stdin.flush()
        assert chat.stdout.readline().strip()  # both ranks are up and in step
        ranks = ranks_of(chat.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[victim], signal.SIGKILL)
        _, err = chat.communicate(timeout=120)
    finally:
        chat.kill()
    assert chat.returncode == 128 + signal.SIGKILL
    assert err.splitlines() == [f"error: rank {victim} was killed by SIGKILL {KILLED}"]
