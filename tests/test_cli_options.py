"""The shared model and sampling flags: declared once (the same on every command), defaults in
the help, --threads, --tp in the app's help, unknown options answered with a real near match,
and the note on re-quantizing a quantized file."""

from __future__ import annotations

import json

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from engine_util import one_thread, run_cli, stories_meta  # noqa: F401
from fixtures_util import require_default_model
from llamarun.cli import app
from llamarun.cli.help import near_options
from llamarun.cli.options import usable_cores

MODEL_COMMANDS = ["bench", "chat", "complete", "info", "perplexity", "serve"]


def options(command: str) -> list[TyperOption]:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return [p for p in cmd.params if isinstance(p, TyperOption)]


def test_every_model_command_has_the_same_model_flags() -> None:
    panels = {c: [p.opts[0] for p in options(c) if p.rich_help_panel == "Model"]
              for c in MODEL_COMMANDS}
    full = ["--model", "--device", "--dtype", "--quantize", "--group-size", "--max-seq-len",
            "--threads", "--compile", "--verbose"]
    for command, flags in panels.items():
        # --compile only where a decode step is compiled
        expected = full if command in ("chat", "complete", "bench", "serve") else \
            [f for f in full if f != "--compile"]
        assert flags == expected, command
    sampling = [[p.opts[0] for p in options(c) if p.rich_help_panel == "Sampling"]
                for c in ("chat", "complete")]
    assert sampling[0] == sampling[1] == ["--max-tokens", "--temperature", "--top-k", "--top-p",
                                          "--min-p", "--repeat-penalty", "--seed", "--stop"]


@pytest.mark.parametrize("command", ["bench", "chat", "complete", "info", "list", "perplexity",
                                     "serve", "tokenize"])
def test_every_value_option_states_its_default(command: str) -> None:
    for p in options(command):
        if p.is_flag and not p.secondary_opts:
            continue  # a bare switch is off unless given
        shown = p.show_default is not False and p.default is not None
        assert shown or "default" in (p.help or "").lower(), f"{command} {p.opts[0]}"


@pytest.mark.parametrize(("command", "default"), [("chat", 512), ("complete", 256)])
def test_max_tokens_help_gives_the_command_default(command: str, default: int) -> None:
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    line = next(line for line in r.stdout.splitlines() if "--max-tokens" in line)
    assert f"(default {default})" in line


def test_app_help_lists_tp() -> None:
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    line = next(line for line in r.stdout.splitlines() if "--tp" in line)
    assert "N" in line and "processes" in line


@pytest.mark.parametrize(("typed", "expected"), [
    ("--temp", ["--temperature"]),
    ("--Model", ["--model"]),
    ("--modle", ["--model"]),
    ("--max-token", ["--max-tokens"]),
    ("--thread", ["--threads"]),
    ("--top", ["--top-k", "--top-p"]),
    ("--temprature", ["--temperature"]),
    ("--tpp", ["--tp"]),
    ("--zzz", []),
    ("-x", []),
])
def test_near_options(typed: str, expected: list[str]) -> None:
    known = [o for p in options("chat") for o in p.opts] + ["--tp", "--version"]
    assert near_options(typed, known) == expected


@pytest.mark.parametrize(("args", "expected"), [
    (["chat", "--temp", "1"], "error: no such option for chat: --temp (did you mean --temperature?)"),
    (["info", "--max-tokens", "3"],
     "error: no such option for info: --max-tokens (an option of chat, complete, perplexity)"),
    (["--seed", "1", "chat"],
     "error: no such option: --seed (an option of chat, complete; put it after the command)"),
])
def test_unknown_options_suggest_real_ones(args: list[str], expected: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.splitlines() == [expected]


def bench_threads(*args: str, env: dict[str, str | None]) -> int:
    r = CliRunner().invoke(app, ["bench", "-m", str(stories_meta()), "-p", "8", "-g", "2",
                                 "-r", "1", "--json", "--no-compile", *args], env=env)
    assert r.exit_code == 0, r.output
    return int(json.loads(r.stdout)["env"]["threads"])


def test_threads_flag_and_default(one_thread: None) -> None:
    import torch

    before = torch.get_num_threads()
    assert bench_threads("--threads", "1", env={"OMP_NUM_THREADS": None}) == 1
    assert bench_threads(env={"OMP_NUM_THREADS": None}) == usable_cores()
    assert bench_threads(env={"OMP_NUM_THREADS": "1"}) == 1
    assert torch.get_num_threads() == before  # an in-process command puts it back


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--threads", "0"], {}, "error: --threads must be at least 1, got 0"),
    ([], {"OMP_NUM_THREADS": "many"},
     "error: OMP_NUM_THREADS must be a positive integer, got 'many' (or give --threads N)"),
])
def test_threads_errors(args: list[str], env: dict[str, str], expected: str) -> None:
    r = CliRunner().invoke(app, ["complete", "-m", str(stories_meta()), "-p", "x", *args],
                           env={"LLAMARUN_MODEL": None, **env})
    assert r.exit_code == 1 and r.stderr.splitlines() == [expected] and r.stdout == ""


def test_threads_beyond_the_cores_is_a_note() -> None:
    r = CliRunner().invoke(app, ["info", "-m", str(stories_meta()), "--threads",
                                 str(usable_cores() + 1)], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    assert f"more than the {usable_cores()} cores" in r.stderr


def test_requantizing_a_quantized_file_says_so() -> None:
    gguf = require_default_model()  # SmolLM2's Q4_1 GGUF
    runner = CliRunner()
    r = runner.invoke(app, ["info", "-m", str(gguf), "--quantize", "int4", "--group-size", "64",
                            "--json"], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if "already quantized" in line]
    assert notes == [f"{gguf.name} is already quantized (Q4_1, Q8_0): --quantize int4 "
                     "re-quantizes its dequantized weights (int4 (group 64), int8), adding "
                     "rounding error; --quantize auto keeps them as stored"]
    assert json.loads(r.stdout)["weights"]["int4 (group 64)"] > 0  # and it did
    kept = runner.invoke(app, ["info", "-m", str(gguf)], env={"LLAMARUN_MODEL": None})
    assert kept.exit_code == 0 and "already quantized" not in kept.stderr
    dense = runner.invoke(app, ["info", "-m", str(stories_meta()), "--quantize", "int8"],
                          env={"LLAMARUN_MODEL": None})
    assert dense.exit_code == 0 and "already quantized" not in dense.stderr
