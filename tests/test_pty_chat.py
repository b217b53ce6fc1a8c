"""`llamarun chat` in a real pseudo-terminal: Ctrl-C stops a reply and the prompt comes back."""

from __future__ import annotations

import os
import sys

import pytest

from engine_util import REPO, stories_meta

pexpect = pytest.importorskip("pexpect")


def test_ctrl_c_stops_reply_then_next_message_is_answered() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TERM": "dumb",
           "COLUMNS": "200"}
    env.pop("LLAMARUN_MODEL", None)
    # A context of 4096 slots lets a greedy reply run for thousands of tokens (seconds).
    child = pexpect.spawn(sys.executable, ["-m", "llamarun", "chat", "-m", str(stories_meta()),
                                           "-t", "0", "-n", "4000", "--max-seq-len", "4096"],
                          env=env, cwd=str(REPO), encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
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
