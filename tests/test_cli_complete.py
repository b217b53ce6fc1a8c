"""`llamarun complete` through CliRunner and as a real subprocess, on stories260K."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamarun.cli import app
from llamarun.engine import Engine
from llamarun.sampling import SamplingParams
from engine_util import REPO, engine, one_thread, run_cli, stories_meta  # noqa: F401

PROMPT = "Once upon a time"


def invoke(*args: str, input: str | None = None):  # noqa: ANN201 (typer's Result)
    return CliRunner().invoke(app, list(args), input=input, env={"LLAMARUN_MODEL": None})


def library_text(engine: Engine, n: int, **kw: object) -> str:
    gen = engine.complete(PROMPT, sampling=SamplingParams.greedy(), max_new_tokens=n, **kw)
    return "".join(c.text for c in gen)


def test_greedy_output_equals_library(engine: Engine) -> None:
    r = invoke("complete", "-m", str(stories_meta()), "--prompt", PROMPT, "-t", "0", "-n", "40")
    assert r.exit_code == 0, r.output
    assert r.stdout == library_text(engine, 40) + "\n"
    line = r.stderr.strip()
    assert "\n" not in line
    assert line.startswith("prompt: 5 tok, ") and "| generation: 40 tok, " in line


def test_prompt_from_stdin_echo_and_quiet(engine: Engine) -> None:
    r = invoke("complete", "-m", str(stories_meta()), "-t", "0", "-n", "10", "--echo", "-q",
               input=PROMPT + "\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == PROMPT + library_text(engine, 10) + "\n"
    assert r.stderr == ""
    r2 = invoke("complete", "-m", str(stories_meta()), "-t", "0", "-n", "10", "-q", "-p", "-",
                input=PROMPT)
    assert r2.stdout == library_text(engine, 10) + "\n"


def test_json_fields_are_consistent(engine: Engine) -> None:
    r = invoke("complete", "-m", str(stories_meta()), "-p", PROMPT, "-t", "0", "-n", "25", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["text"] == library_text(engine, 25)
    assert obj["finish_reason"] == "length"
    assert obj["prompt_tokens"] == 5 and obj["completion_tokens"] == 25 == len(obj["token_ids"])
    assert engine.tokenizer.decode(obj["token_ids"]) == obj["text"]
    t = obj["timings"]
    for key in ("load_s", "prefill_s", "prefill_tok_s", "time_to_first_token_s", "decode_s",
                "decode_tok_s"):
        assert t[key] > 0, key
    assert t["prefill_tok_s"] == pytest.approx(5 / t["prefill_s"])
    assert t["decode_tok_s"] == pytest.approx(24 / t["decode_s"])
    assert r.stderr == ""


def test_stop_string_not_printed(engine: Engine) -> None:
    r = invoke("complete", "-m", str(stories_meta()), "-p", PROMPT, "-t", "0", "-n", "40",
               "--stop", "Lily", "--stop", "zzz", "--json")
    obj = json.loads(r.stdout)
    assert obj["finish_reason"] == "stop"
    assert obj["text"] == ", there was a little girl named "
    r = invoke("complete", "-m", str(stories_meta()), "-p", PROMPT, "-t", "0", "-n", "40",
               "--stop", " Lily", "-q")
    assert r.stdout == ", there was a little girl named\n"
    assert "Lily" not in r.stdout and "Li" not in r.stdout


def test_seed_reproduces_sampled_output() -> None:
    args = ["complete", "-m", str(stories_meta()), "-p", PROMPT, "-n", "30", "-t", "1.0", "-q"]
    a = invoke(*args, "--seed", "42")
    b = invoke(*args, "--seed", "42")
    c = invoke(*args, "--seed", "43")
    assert a.exit_code == 0 and a.stdout == b.stdout and a.stdout != c.stdout


def _bad_checkpoint(tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(stories_meta(), bad)
    (bad / "consolidated.00.pth").write_bytes(b"\x00not a checkpoint" * 50)
    return bad


@pytest.mark.parametrize("case", [
    "missing-folder", "empty-folder", "corrupt-file", "bad-json", "top-p", "temperature",
    "too-long", "device", "dtype", "max-tokens", "no-prompt",
])
def test_user_errors_are_one_line(case: str, tmp_path: Path) -> None:
    model = str(stories_meta())
    args = ["-p", PROMPT]
    if case == "missing-folder":
        model = str(tmp_path / "nope")
    elif case == "empty-folder":
        model = str(tmp_path)
    elif case == "corrupt-file":
        model = str(_bad_checkpoint(tmp_path))
    elif case == "bad-json":
        bad = _bad_checkpoint(tmp_path)
        (bad / "params.json").write_text("{not json")
        model = str(bad)
    elif case == "top-p":
        args += ["--top-p", "1.5"]
    elif case == "temperature":
        args += ["--temperature", "-1"]
    elif case == "too-long":
        args = ["-p", PROMPT + " there was a little girl named Lily", "--max-seq-len", "8"]
    elif case == "device":
        args += ["--device", "tpu"]
    elif case == "dtype":
        args += ["--dtype", "int3"]
    elif case == "max-tokens":
        args += ["--max-tokens", "0"]
    elif case == "no-prompt":
        args = ["-p", "-"]
    r = invoke("complete", "-m", model, *args, input="" if case == "no-prompt" else None)
    if case == "no-prompt":  # an empty prompt on stdin still gets BOS: not an error
        assert r.exit_code == 0
        return
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and r.stdout == ""


def test_verbose_shows_traceback(tmp_path: Path) -> None:
    r = invoke("complete", "-m", str(tmp_path / "nope"), "-p", "x", "-v")
    assert r.exit_code != 0 and r.exception is not None


def test_subprocess_matches_library_and_errors(engine: Engine) -> None:
    r = run_cli("complete", "-m", str(stories_meta()), "-p", PROMPT, "-t", "0", "-n", "30")
    assert r.returncode == 0, r.stderr
    assert r.stdout == library_text(engine, 30) + "\n"
    assert r.stderr.startswith("prompt: 5 tok")
    bad = run_cli("complete", "-m", "/definitely/missing", "-p", "x")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    usage = run_cli("complete", "--max-tokens", "abc")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
    assert usage.stderr.startswith("error: ") and "--max-tokens" in usage.stderr


def test_closed_pipe_ends_quietly() -> None:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HOME": str(Path.home())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamarun", "complete", "-m", str(stories_meta()), "-p", PROMPT,
         "-t", "0", "-n", "400", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(20)  # like `| head -c 20`: read a little, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert head == b", there was a little"
    assert "Traceback" not in err and "Exception" not in err and err == "", err


def hf_with_generation_config(tmp_path: Path, cfg: dict[str, object]) -> Path:
    hf = tmp_path / "hf"
    hf.mkdir(parents=True)
    for f in (stories_meta().parent / "hf").iterdir():
        if f.name != "generation_config.json":
            (hf / f.name).symlink_to(f)
    (hf / "generation_config.json").write_text(json.dumps(cfg))
    return hf


def test_generation_config_defaults_applied_and_overridden(tmp_path: Path) -> None:
    base = ["complete", "-p", PROMPT, "-n", "20", "--dtype", "float32", "-q", "--seed", "1"]
    greedy_model = hf_with_generation_config(tmp_path / "a", {"do_sample": False})
    hot_model = hf_with_generation_config(tmp_path / "b", {"temperature": 1.5, "top_k": 0,
                                                           "min_p": 0.0})
    hf_engine = Engine.load(hot_model, device="cpu", dtype="float32")
    greedy = "".join(c.text for c in hf_engine.complete(
        PROMPT, sampling=SamplingParams.greedy(), max_new_tokens=20)) + "\n"
    r = invoke(*base, "-m", str(greedy_model))
    assert r.exit_code == 0 and r.stdout == greedy  # the model asks for greedy: no flag needed
    hot = invoke(*base, "-m", str(hot_model))
    assert hot.exit_code == 0 and hot.stdout != greedy
    # flags override the model's defaults, either way
    r = invoke(*base, "-m", str(greedy_model), "-t", "1.5", "--top-k", "0", "--min-p", "0")
    assert r.stdout == hot.stdout
    assert invoke(*base, "-m", str(hot_model), "-t", "0").stdout == greedy


def test_one_shot_commands_do_not_compile_in_the_background(
        one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """complete stays eager unless --compile (its tokens then never depend on whether a
    background compile finished); chat compiles in the background where that pays: not where
    the eager decode step is one call of llamarun's fused CPU kernels."""
    from llamarun import kernels
    from llamarun.cli.common import load_engine
    from llamarun.cli.options import ModelOptions

    started: list[Engine] = []
    monkeypatch.setattr(Engine, "compile_in_background", lambda self: started.append(self))
    opts = ModelOptions(str(stories_meta()), dtype="float32")
    assert opts.compile is None
    one_shot = load_engine(opts)
    assert started == [] and one_shot.compile_state == "off"
    chat = load_engine(opts, background=True)
    fused = chat.model.fuses_decode()
    assert fused == (kernels.attend_available() and kernels.f32_available())
    assert started == ([] if fused else [chat]) and chat.compile_pays is not fused
    monkeypatch.setattr(kernels, "fuse_layers", False)  # op by op: a compiled step pays
    unfused = load_engine(opts, background=True)
    assert not unfused.model.fuses_decode() and started[-1] is unfused
