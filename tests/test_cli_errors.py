"""Every user mistake with a flag or `/set` is one `error:` line naming it, with the accepted range."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamarun.cli import app
from engine_util import one_thread, stories_meta  # noqa: F401

SAMPLING = [
    ("--temperature", "-1", "--temperature must be at least 0 (0 = greedy), got -1.0"),
    ("--temperature", "nan", "--temperature must be at least 0 (0 = greedy), got nan"),
    ("--top-k", "-1", "--top-k must be at least 0 (0 = off), got -1"),
    ("--top-p", "1.5", "--top-p must be in (0, 1] (1 = off), got 1.5"),
    ("--top-p", "0", "--top-p must be in (0, 1] (1 = off), got 0.0"),
    ("--min-p", "2", "--min-p must be in [0, 1] (0 = off), got 2.0"),
    ("--repeat-penalty", "0", "--repeat-penalty must be above 0 (1 = off), got 0.0"),
    ("--seed", "-3", "--seed must be in [0, 2**63), got -3"),
    ("--max-tokens", "0", "--max-tokens must be at least 1, got 0"),
]
MODEL = [
    ("--device", "tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("--dtype", "int3", "--dtype must be auto, float32, bfloat16 or float16, got 'int3'"),
    ("--quantize", "int2", "--quantize must be one of auto, none, int8, int4, got 'int2'"),
    ("--group-size", "48", "--group-size must be one of 32, 64, 128, got 48"),
    ("--max-seq-len", "1", "--max-seq-len must be at least 2, got 1"),
]


def invoke(args: list[str], *, input: str | None = None):  # noqa: ANN201 (typer's Result)
    return CliRunner().invoke(app, args, input=input, env={"LLAMARUN_MODEL": None})


def one_error_line(r, expected: str) -> None:  # noqa: ANN001
    assert r.exit_code == 1, r.output
    assert r.stderr == f"error: {expected}\n"
    assert r.stdout == ""


@pytest.mark.parametrize("command", ["complete", "chat"])
@pytest.mark.parametrize(("flag", "value", "expected"), SAMPLING + MODEL)
def test_flag_errors_come_before_choosing_a_model(command: str, flag: str, value: str,
                                                  expected: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # No --model and no ./checkpoints: a model would be the embedded default (with a note first).
    monkeypatch.chdir(tmp_path)
    prompt = ["-p", "x"] if command == "complete" else []
    one_error_line(invoke([command, *prompt, flag, value]), expected)


@pytest.mark.parametrize("command", ["info", "bench", "perplexity"])
def test_model_flag_errors_in_other_commands(command: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    one_error_line(invoke([command, "--dtype", "int3"]), MODEL[1][2])


@pytest.mark.parametrize(("args", "expected"), [
    (["-g", "0"], "--gen-tokens must be at least 1, got 0"),
    (["-r", "0"], "--repetitions must be at least 1, got 0"),
    (["-p", "12,x"], "--prompt-tokens must be positive integers like 512,128, got '12,x'"),
    (["-p", "0"], "--prompt-tokens must be positive integers like 512,128, got '0'"),
    (["-o", "xml"], "--output must be one of table, md, json, jsonl, got 'xml'"),
])
def test_bench_flag_errors(args: list[str], expected: str) -> None:
    one_error_line(invoke(["bench", "-m", str(stories_meta()), *args]), expected)


@pytest.mark.parametrize(("args", "expected"), [
    (["--ctx", "1"], "--ctx must be at least 2, got 1"),
    (["--stride", "0"], "--stride must be at least 1, got 0"),
    (["--max-tokens", "1"], "--max-tokens must be at least 2, got 1"),
])
def test_perplexity_flag_errors(args: list[str], expected: str) -> None:
    one_error_line(invoke(["perplexity", "-m", str(stories_meta()), *args]), expected)


SET = [
    ("temperature -1", "temperature must be at least 0 (0 = greedy), got -1"),
    ("temperature abc", "temperature must be a number at least 0 (0 = greedy), got 'abc'"),
    ("top_k 1.5", "top_k must be an integer at least 0 (0 = off), got '1.5'"),
    ("top_k -2", "top_k must be at least 0 (0 = off), got -2"),
    ("top_p 2", "top_p must be in (0, 1] (1 = off), got 2"),
    ("min_p -0.1", "min_p must be in [0, 1] (0 = off), got -0.1"),
    ("repeat_penalty 0", "repeat_penalty must be above 0 (1 = off), got 0"),
    ("seed x", "seed must be an integer in [0, 2**63) or none, got 'x'"),
    ("max_tokens abc", "max_tokens must be an integer at least 1, got 'abc'"),
    ("max_tokens 0", "max_tokens must be at least 1, got 0"),
]


def test_set_errors_name_the_setting(one_thread: None) -> None:
    script = "".join(f"/set {s}\n" for s, _ in SET)
    r = invoke(["chat", "-m", str(stories_meta()), "--dtype", "float32"], input=script)
    assert r.exit_code == 0, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {expected}" for _, expected in SET]


@pytest.mark.parametrize(("args", "expected"), [
    (["complete", "--max-tokens", "abc", "-p", "x"], "error: --max-tokens must be an integer, got 'abc'"),
    (["complete", "-t", "warm", "-p", "x"], "error: --temperature must be a number, got 'warm'"),
    (["chat", "--top-k=1.5"], "error: --top-k must be an integer, got '1.5'"),
    (["serve", "--port", "http"], "error: --port must be an integer, got 'http'"),
])
def test_non_numbers_name_the_flag(args: list[str], expected: str) -> None:
    from engine_util import run_cli

    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [expected]


def test_serve_prefill_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamarun.cli.serve import PREFILL_CHUNK_SHOWN
    from llamarun.scheduler import DEFAULT_PREFILL_CHUNK

    assert int(PREFILL_CHUNK_SHOWN) == DEFAULT_PREFILL_CHUNK  # what --help shows is what runs
    monkeypatch.chdir(tmp_path)
    one_error_line(invoke(["serve", "--port", "0", "--prefill-chunk", "0"]),
                   "--prefill-chunk must be at least 1, got 0")
