"""`llamarun bench --tokens-per-sec` on stories260K: every field present, positive and consistent."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rich.console import Console

from llamarun import memory_read
from llamarun.bench import BenchStep, run_bench
from llamarun.cli import console
from llamarun import device as device_mod
from llamarun.device import default_dtype, device_name
from llamarun.cli import app
from llamarun.engine import Engine
from engine_util import engine, one_thread, stories_meta  # noqa: F401


def invoke(*args: str):  # noqa: ANN201 (typer's Result)
    return CliRunner().invoke(app, ["bench", "-m", str(stories_meta()), *args],
                              env={"LLAMARUN_MODEL": None})


def test_bench_json_fields(one_thread: None) -> None:
    r = invoke("--tokens-per-sec", "--prompt-tokens", "64,32", "--gen-tokens", "16", "-r", "2",
               "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["repetitions"] == 2 and d["compiled"] is False
    for key in ("load_s", "warmup_s", "n_params", "model_bytes", "bytes_per_token",
                "peak_rss_bytes"):
        assert d[key] > 0, key
    width = {"float32": 4, "bfloat16": 2}[d["dtype"]]  # --dtype auto: what this CPU runs best
    assert d["n_params"] == 292_800 and d["model_bytes"] == width * d["n_params"]
    # untied embedding: a decoded token reads one of its 512 rows
    assert d["bytes_per_token"] == d["model_bytes"] - 511 * 64 * width
    assert d["peak_device_bytes"] is None
    assert [p["prompt_tokens"] for p in d["prefill"]] == [64, 32]
    for p in d["prefill"]:
        assert len(p["tok_s"]["values"]) == 2 and p["tok_s"]["mean"] > 0
        for tok_s, secs in zip(p["tok_s"]["values"], p["time_to_first_token_s"]["values"]):
            assert tok_s * secs == pytest.approx(p["prompt_tokens"])
    dec = d["decode"]
    assert dec["gen_tokens"] == 16
    for tok_s, secs in zip(dec["tok_s"]["values"], dec["seconds"]["values"]):
        assert tok_s * secs == pytest.approx(16)
    assert 0 < dec["time_per_token_p50_s"] <= dec["time_per_token_p90_s"]
    assert dec["bandwidth_gb_s"] == pytest.approx(d["bytes_per_token"] * dec["tok_s"]["mean"] / 1e9)
    env = d["env"]
    for key in ("torch", "llamarun", "device_name", "dtype", "threads", "python"):
        assert env[key], key
    auto = default_dtype(torch.device("cpu"), torch.float32)  # the checkpoint is float32
    assert env["dtype"] == d["dtype"] == str(auto).removeprefix("torch.")


@pytest.mark.parametrize("fmt", ["md", "jsonl", "table"])
def test_bench_other_formats(fmt: str, one_thread: None) -> None:
    r = invoke("-p", "16,8", "-g", "4", "-r", "1", "--output", fmt)
    assert r.exit_code == 0, r.output
    if fmt == "jsonl":
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert [x["prefill"]["prompt_tokens"] for x in lines] == [16, 8]
    elif fmt == "md":
        assert r.stdout.startswith("| metric | value |") and "| pp16 |" in r.stdout
    else:
        assert "tg4" in r.stdout and "pp8" in r.stdout


def test_bench_memory_read(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_read, "READ_BYTES", 8 << 20)  # the test's read: 8 MiB
    r = invoke("-p", "8", "-g", "4", "-r", "1", "--json", "--memory-read")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    m = d["memory_read"]
    assert m["bytes"] == 8 << 20 and 0 < m["plain_gb_s"] <= m["gb_s"]
    assert m["decode_vs_read"] == pytest.approx(d["decode"]["bandwidth_gb_s"] / m["gb_s"])
    assert m["form"].split(", ")[0] in ("dot", "sum")
    r = invoke("-p", "8", "-g", "4", "-r", "1", "--memory-read")
    line = next(x for x in r.stdout.splitlines() if x.startswith("memory read: "))
    assert "GB/s" in line and "decode streams" in line
    r = invoke("-p", "8", "-g", "4", "-r", "1", "--json")  # not asked for: not measured
    assert json.loads(r.stdout)["memory_read"] is None


def test_bench_memory_read_short_of_memory(one_thread: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 536870912 bytes.\nmore")

    monkeypatch.setattr(memory_read, "measure", fail)
    r = invoke("-p", "8", "-g", "4", "-r", "1", "--memory-read")
    assert r.exit_code == 0, r.output  # the measured runs are reported
    assert "tg4" in r.stdout
    assert ("memory read: not measured (RuntimeError: DefaultCPUAllocator: not enough memory: "
            "you tried to allocate 536870912 bytes.)") in r.stdout.splitlines()


def test_run_bench_memory_read_is_the_last_step(engine: Engine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_read, "READ_BYTES", 8 << 20)
    steps: list[BenchStep] = []
    run_bench(engine, prompt_tokens=(4,), gen_tokens=2, repetitions=1, memory_read=True,
              progress=steps.append)
    assert [(s.name, s.repetition) for s in steps][-1] == ("memory read", 1)
    assert [s.index for s in steps] == list(range(1, 6)) and {s.total for s in steps} == {5}


def test_cpu_device_name(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                    "model name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")
    monkeypatch.setattr(device_mod, "_CPUINFO", info)
    assert device_name(torch.device("cpu")) == "AMD EPYC 9R14 96-Core Processor"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # no model name (some ARM kernels)
    import platform
    assert device_name(torch.device("cpu")) == (platform.processor() or platform.machine() or "cpu")
    monkeypatch.setattr(device_mod, "_CPUINFO", tmp_path / "missing")
    assert device_name(torch.device("cpu")) == (platform.processor() or platform.machine() or "cpu")


def test_bench_bad_values() -> None:
    for args in (["-p", "12,x"], ["-p", "0"], ["-g", "0"], ["-o", "xml"]):
        r = invoke(*args)
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_run_bench_grows_the_cache(engine: Engine) -> None:
    result = run_bench(engine, prompt_tokens=(600,), gen_tokens=2, repetitions=1)
    assert engine.max_seq_len >= 601 and result.prefill[0].prompt_tokens == 600


def test_progress_steps_in_order(engine: Engine) -> None:
    steps: list[BenchStep] = []
    run_bench(engine, prompt_tokens=(8, 4), gen_tokens=3, repetitions=2, progress=steps.append)
    assert [(s.name, s.repetition) for s in steps] == [
        ("pp8", 0), ("pp4", 0), ("tg3", 0),
        ("pp8", 1), ("pp4", 1), ("tg3", 1), ("pp8", 2), ("pp4", 2), ("tg3", 2)]
    assert [s.index for s in steps] == list(range(1, 10)) and {s.total for s in steps} == {9}


def test_progress_on_a_terminal_only(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    r = invoke("-p", "8", "-g", "2", "-r", "1", "--json")
    assert r.exit_code == 0 and r.stderr == ""  # stderr not a terminal: nothing but errors
    monkeypatch.setattr(console, "err", Console(stderr=True, force_terminal=True, width=100))
    r = invoke("-p", "8", "-g", "2", "-r", "2", "--json")
    assert r.exit_code == 0, r.output
    for text in ("warm-up (and compile): pp8", "repetition 2 of 2: tg2", "0:00:"):
        assert text in r.stderr, text
    json.loads(r.stdout)


def test_one_repetition_shows_no_spread_and_pipes_plain(one_thread: None) -> None:
    r = invoke("-p", "8", "-g", "2", "-r", "1")
    assert r.exit_code == 0, r.output
    assert "±" not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0].startswith("model: ") and str(stories_meta()) in lines[0]
    assert all(line == line.rstrip() and ": " in line for line in lines)
    r = invoke("-p", "8", "-g", "2", "-r", "2", "-o", "md")
    assert "±" in r.stdout
