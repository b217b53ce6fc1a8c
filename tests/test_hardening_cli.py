"""Hostile input to the command line (issue 9): invalid UTF-8, closed streams, signals, escape
codes, unclosed blocks, impossible lengths. Each ends in a result or one `error:` line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamarun.cli import app
from engine_util import REPO, run_cli, stories_meta

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LLAMARUN_COMPILE": "0"}
ENV.pop("LLAMARUN_MODEL", None)


def cli_bytes(*args: bytes | str, input: bytes | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """`python -m llamarun ARGS` with raw bytes in argv and on stdin."""
    argv = [a if isinstance(a, bytes) else a.encode() for a in args]
    return subprocess.run([sys.executable.encode(), b"-m", b"llamarun", *argv], input=input,
                          capture_output=True, timeout=timeout, env=ENV, cwd=REPO)


def one_line_error(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


# --- invalid UTF-8 (replaced by U+FFFD, with a note) -----------------------------------------

def test_invalid_utf8_prompt_flag_and_stdin() -> None:
    model = str(stories_meta())
    for args, stdin in (((b"-p", b"Once upon a \xff\xfe time"), None),
                        ((b"-p", b"-"), b"Once upon a \xff time\n"),
                        ((), b"Once upon a \xc3 time\n")):
        r = cli_bytes("complete", "-m", model, "-t", "0", "-n", "4", "-q", *args, input=stdin)
        assert r.returncode == 0, r.stderr
        assert b"not valid UTF-8: invalid bytes replaced by U+FFFD" in r.stderr
        assert b"Traceback" not in r.stderr and r.stdout.strip()


def test_invalid_utf8_in_piped_chat_and_tokenize() -> None:
    model = str(stories_meta())
    r = cli_bytes("chat", "-m", model, "-t", "0", "-n", "4", input=b"Hi \xff there\nHello\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.decode().splitlines()) == 2 and b"Traceback" not in r.stderr
    r = cli_bytes("tokenize", "-m", model, "--json", b"a\xffb")
    assert r.returncode == 0, r.stderr
    assert "\ufffd" in "".join(json.loads(r.stdout)["pieces"]) or json.loads(r.stdout)["ids"]
    assert b"replaced by U+FFFD" in r.stderr


# --- streams and signals --------------------------------------------------------------------

def test_closed_stdout_is_one_line() -> None:
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m llamarun complete -m "
                        f"{stories_meta()} -p hi -n 2 >&-"], capture_output=True, env=ENV,
                       cwd=REPO, timeout=120)
    assert r.returncode == 1
    assert one_line_error(r.stderr) == "error: standard output is closed; nothing could be printed"


@pytest.mark.parametrize("args", [
    ["--help"], ["chat", "--help"], ["list"], ["info"], ["tokenize", "hello"],
    ["complete", "-p", "Once upon a time", "-n", "300", "-t", "0", "-q"],
])
def test_closed_pipe_exit_code_is_the_same_for_every_command(args: list[str]) -> None:
    if args[0] in ("info", "tokenize", "complete"):
        args = [args[0], "-m", str(stories_meta()), *args[1:]]
    proc = subprocess.Popen([sys.executable, "-m", "llamarun", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -c0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Exception" not in err, err


def test_sigterm_ends_with_one_line_and_143() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamarun", "complete", "-m", str(stories_meta()), "-p", "Once",
         "-n", "100000", "--max-seq-len", "100000", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(20)  # generating
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert one_line_error(err) == "error: terminated (SIGTERM)"


def test_sigterm_while_a_rank_leaves_on_a_lost_peer_ends_as_sigterm(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A --tp rank whose peer died is itself told to stop (SIGTERM from the launcher) while it
    is on its way out: it must still end with 143, which the launcher reads as a follower's
    status, not with an uncaught `Terminated` (status 1, blamed as the job's first failure)."""
    import llamarun.cli as cli
    from llamarun.cli import distributed

    def lost() -> None:
        raise RuntimeError("Connection reset by peer")

    def sigterm_on_the_way_out(e: BaseException) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in here

    codes: list[int] = []

    def record(code: int) -> None:
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli, "_main", lost)
    monkeypatch.setattr(cli, "_exit", record)
    monkeypatch.setattr(distributed, "joined", lambda: True)
    monkeypatch.setattr(distributed, "is_peer_failure", lambda e: True)
    monkeypatch.setattr(distributed, "stopped_by_launcher", lambda: True)
    monkeypatch.setattr(distributed, "peer_lost", sigterm_on_the_way_out)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert codes == [128 + signal.SIGTERM]


def test_ctrl_c_while_torch_imports_has_no_traceback() -> None:
    for delay in (0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "llamarun", "list"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
        assert proc.returncode in (130, -signal.SIGINT, 0), err


def test_import_llamarun_does_not_import_torch() -> None:
    code = "import sys, llamarun; print('torch' in sys.modules, llamarun.SamplingParams.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                         cwd=REPO, timeout=60)
    assert out.stdout.split() == ["False", "SamplingParams"], out.stderr


def test_escape_codes_never_reach_the_terminal(tmp_path: Path) -> None:
    evil = tmp_path / "\x1b[2J\x1b]0;pwned\x07model"
    r = run_cli("complete", "-m", str(evil), "-p", "x")
    assert r.returncode == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


# --- chat -----------------------------------------------------------------------------------

def chat(script: str, *args: str):  # noqa: ANN201
    return CliRunner().invoke(app, ["chat", "-m", str(stories_meta()), "-t", "0", "-n", "6",
                                    *args], input=script, env={"LLAMARUN_MODEL": None})


def test_unclosed_block_at_end_of_input_is_sent() -> None:
    r = chat('"""\nOnce upon a time\nthere was')
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) >= 1 and r.stdout.strip()
    assert 'end of input inside a """ block: sending the message as read' in r.stderr


def test_piped_chat_exits_non_zero_when_a_message_failed() -> None:
    r = chat("Once upon a time there was a little girl named Lily who loved to play\nHi\n",
             "--max-seq-len", "24")
    assert r.exit_code == 1
    assert r.stderr.count("error: the message needs") == 1 and r.stdout.count("\n") == 1
    ok = chat("Hi\n")
    assert ok.exit_code == 0


# --- bench and context ----------------------------------------------------------------------

def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(app, list(args), env={"LLAMARUN_MODEL": None})


def test_bench_lengths_checked_before_it_starts() -> None:
    model = str(stories_meta())
    r = invoke("bench", "-m", model, "-p", str(10 ** 12), "-g", "4", "-r", "1")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith(f"error: --prompt-tokens {10 ** 12} and --gen-tokens 4 need a KV "
                               f"cache of {10 ** 12 + 1} positions: not enough memory on cpu")
    r = invoke("bench", "-m", model, "-p", "8", "-g", str(10 ** 15), "-r", "1")
    assert r.exit_code == 1 and "need a KV cache of" in r.stderr and "\n" not in r.stderr[:-1]
    r = invoke("bench", "-m", model, "-p", "100", "-g", "4", "--max-seq-len", "64")
    assert r.exit_code == 1
    assert r.stderr == ("error: --prompt-tokens 100 and --gen-tokens 4 need a context of 101 "
                        "tokens, more than --max-seq-len 64\n")


def test_absurd_max_seq_len_is_one_line() -> None:
    r = run_cli("complete", "-m", str(stories_meta()), "-p", "x", "--max-seq-len", str(10 ** 30))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "not enough memory on cpu" in r.stderr
    assert "would fit: --max-seq-len 512" in r.stderr


def test_max_seq_len_beyond_context_warns() -> None:
    r = run_cli("complete", "-m", str(stories_meta()), "-p", "x", "-n", "2", "-q",
                "--max-seq-len", "1024")
    assert r.returncode == 0, r.stderr
    assert "beyond the model's trained context of 512 tokens" in " ".join(r.stderr.split())
