"""`llamarun chat` in a real pseudo-terminal: Ctrl-C stops a reply and the prompt comes back."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from engine_util import REPO, stories_meta

pexpect = pytest.importorskip("pexpect")


def as_at_a_terminal() -> None:
    """In the chat's process before it starts: SIGINT as a shell at a terminal leaves it (the
    default action, not blocked). Otherwise the test process's own state would pass on: an
    ignored SIGINT stays ignored across exec, and Python then installs no KeyboardInterrupt for
    it. (The chat takes SIGINT over during a reply, but at the prompt relies on Python's.) The
    suite run as a background job of a non-interactive shell (`... &`) starts with SIGINT
    ignored: there Ctrl-C at the prompt did nothing, and this test timed out."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_reply_then_next_message_is_answered() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TERM": "dumb",
           "COLUMNS": "200"}
    env.pop("LLAMARUN_MODEL", None)
    # A context of 4096 slots lets a greedy reply run for thousands of tokens (seconds).
    child = pexpect.spawn(sys.executable, ["-m", "llamarun", "chat", "-m", str(stories_meta()),
                                           "-t", "0", "-n", "4000", "--max-seq-len", "4096"],
                          env=env, cwd=str(REPO), encoding="utf-8", timeout=60,
                          dimensions=(40, 200), preexec_fn=as_at_a_terminal)
    try:
        child.expect_exact(">>> ")
        child.sendline("Tell me a story")
        child.expect_exact("Tell me a story")  # the terminal echo
        child.expect(r"\w{3}")  # the reply has started streaming
        child.sendintr()
        child.expect_exact("[reply stopped]")
        child.expect_exact(">>> ")
        child.sendline("/set max_tokens 8")
        child.expect_exact("max_tokens = 8")
        child.expect_exact(">>> ")
        child.sendline("Hi")
        child.expect_exact("context tokens left]")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def spawn_chat(*args: str):  # noqa: ANN201 (pexpect.spawn)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TERM": "dumb",
           "COLUMNS": "200"}
    env.pop("LLAMARUN_MODEL", None)
    return pexpect.spawn(sys.executable, ["-m", "llamarun", "chat", "-m", str(stories_meta()),
                                          "--no-compile", *args],
                         env=env, cwd=str(REPO), encoding="utf-8", timeout=60,
                         dimensions=(40, 200), preexec_fn=as_at_a_terminal)


def test_stats_after_ctrl_c_counts_the_tokens_shown() -> None:
    from llamarun.tokenizer import load_tokenizer

    child = spawn_chat("-t", "0", "-n", "4000", "--max-seq-len", "4096")
    try:
        child.expect_exact(">>> ")
        child.sendline("Tell me a story")
        child.expect_exact("Tell me a story\r\n")
        child.expect(r"\w{3}")
        shown = child.before + child.after
        child.sendintr()
        child.expect_exact("[reply stopped]")
        shown = (shown + child.before).strip()
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect(r"generated (\d+) tok \([\d.]+ tok/s\), finish cancelled")
        generated = int(child.match.group(1))
        child.expect(r"context: (\d+) of 4096")
        used = int(child.match.group(1))
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    tok = load_tokenizer(stories_meta())
    # The tokens of the text shown (re-encoding may merge a piece or two differently), and the
    # turn is kept in the conversation: its tokens are in the context.
    assert generated > 0 and abs(len(tok.encode(shown, bos=False)) - generated) <= 2, shown
    assert used > generated


def test_keys_typed_during_a_reply_wait_at_the_prompt_and_ctrl_d_ends_after_it() -> None:
    child = spawn_chat("-t", "0", "-n", "1500", "--max-seq-len", "4096")
    try:
        child.expect_exact(">>> ")
        child.sendline("Hi")
        child.expect_exact("Hi\r\n")
        child.expect(r"\w{3}")  # streaming
        child.send("zebra")
        child.expect_exact("context tokens left]")
        assert "zebra" not in child.before  # not echoed into the reply
        child.expect_exact(">>> zebra")  # offered at the next prompt, editable
        child.send("\x15")  # Ctrl-U: clear it
        child.sendline("Hello")
        child.expect_exact("Hello\r\n")
        child.expect(r"\w{3}")
        child.sendeof()  # Ctrl-D during the reply: the reply goes on to its end, then the chat ends
        child.expect_exact("context tokens left]")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def waiting_for_input(child, timeout: float = 5.0) -> None:  # noqa: ANN001 (pexpect.spawn)
    """Return once the chat's main thread sleeps in its read of the terminal (or after
    `timeout` where /proc does not tell).

    CPython's readline shows the prompt, then waits in select(): a SIGINT landing between the
    two is taken only at the next key (Modules/readline.c, readline_until_enter_or_signal),
    which no person can hit but a test sending Ctrl-C the moment ">>> " appears does, now and
    then (a bare input() under 3 CPU hogs: 11 of 300 such Ctrl-Cs lost)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child.pid}/wchan") as f:
                if any(w in f.read() for w in ("poll", "select")):
                    return
        except OSError:  # no /proc: give it a moment
            time.sleep(0.5)
            return
        time.sleep(0.01)


def signal_state(child) -> str:  # noqa: ANN001 (pexpect.spawn)
    """The chat's signal masks and each thread's wait, from /proc (for a failure's message)."""
    proc = Path(f"/proc/{child.pid}")
    try:
        status = (proc / "status").read_text().splitlines()
        waits = [(task / "wchan").read_text() for task in sorted((proc / "task").iterdir())]
    except OSError as e:
        return f"no /proc state ({e})"
    return f"{[line for line in status if line.startswith('Sig')]}, threads waiting in {waits}"


def test_ctrl_c_at_the_prompt_exits_130() -> None:
    child = spawn_chat()
    try:
        child.expect_exact(">>> ")
        waiting_for_input(child)
        child.sendintr()
        try:
            child.expect(pexpect.EOF)
        except pexpect.TIMEOUT:
            raise AssertionError(
                f"Ctrl-C at the prompt did not end the chat: {signal_state(child)}") from None
    finally:
        child.close(force=True)
    assert child.exitstatus == 130 and "Traceback" not in child.before
