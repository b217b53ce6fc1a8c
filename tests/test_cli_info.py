"""`llamarun info` on stories260K."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import torch

from llamarun import kernels
from llamarun.cli import app
from llamarun.device import default_dtype, device_name
from engine_util import one_thread, stories_meta  # noqa: F401


def test_info_table(one_thread: None) -> None:
    r = CliRunner().invoke(app, ["info", "-m", str(stories_meta())], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    auto = str(default_dtype(torch.device("cpu"), torch.float32)).removeprefix("torch.")
    for text in ("meta", "292.80K", "sentencepiece", "llama2", "2 '</s>'", "config.n_kv_heads",
                 auto, f"22 {auto}"):  # 22 matrices: embedding, output, 4 per layer
        assert text in r.stdout, text
    assert "dtype: float32 (auto: stored as float32)" in r.stdout


def test_info_json(one_thread: None) -> None:
    r = CliRunner().invoke(app, ["info", "-m", str(stories_meta()), "--json"],
                           env={"LLAMARUN_MODEL": None})
    d = json.loads(r.stdout)
    assert d["layout"] == "meta" and d["parameters"] == 292_800 and d["tokenizer"] == "sentencepiece"
    assert d["chat_format"] == "llama2" and d["stop_tokens"] == {"2": "</s>"}
    assert d["config"]["n_layers"] == 5 and d["kv_cache_tokens"] == 512
    assert d["device"] == "cpu" and d["device_name"] == device_name(torch.device("cpu"))
    assert d["threads"] == torch.get_num_threads()
    r = CliRunner().invoke(app, ["info", "-m", str(stories_meta())], env={"LLAMARUN_MODEL": None})
    assert f"device: cpu ({d['device_name']}, {d['threads']} threads)" in r.stdout.splitlines()
    ours = kernels.bf16_available() or kernels.int8_available()
    assert d["kernels"].startswith("llamarun's" if ours else "PyTorch's")
    assert ("int4" in d["kernels"]) == kernels.int4_available()


def test_info_hf_layout(one_thread: None) -> None:
    hf = stories_meta().parent / "hf"
    r = CliRunner().invoke(app, ["info", "-m", str(hf), "--json"], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layout"] == "hf"


def test_info_missing_model(tmp_path) -> None:  # noqa: ANN001
    r = CliRunner().invoke(app, ["info", "-m", str(tmp_path / "x")], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 1 and r.stderr.startswith("error: ")


def test_info_piped_keeps_whole_lines(one_thread: None, tmp_path) -> None:  # noqa: ANN001
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "stories260K"
    deep.parent.mkdir()
    deep.symlink_to(stories_meta())
    r = CliRunner().invoke(app, ["info", "-m", str(deep)], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert f"checkpoint: {deep}" in lines  # whole, however long (`info | grep checkpoint`)
    assert all(line == line.rstrip() for line in lines)
    assert "layout: meta" in lines and "config.n_layers: 5" in lines


def test_info_shows_sampling_defaults(one_thread: None, tmp_path) -> None:  # noqa: ANN001
    hf = tmp_path / "hf"
    hf.mkdir(parents=True)
    for f in (stories_meta().parent / "hf").iterdir():
        (hf / f.name).symlink_to(f)
    (hf / "generation_config.json").unlink()
    (hf / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}')
    r = CliRunner().invoke(app, ["info", "-m", str(hf)], env={"LLAMARUN_MODEL": None})
    assert ("sampling defaults: temperature 0.6 (generation_config.json), top_k 40, top_p 0.9 "
            "(generation_config.json), min_p 0.05, repeat_penalty 1.0") in r.stdout.splitlines()
    r = CliRunner().invoke(app, ["info", "-m", str(hf), "--json"], env={"LLAMARUN_MODEL": None})
    d = json.loads(r.stdout)
    assert d["sampling_defaults"] == {"temperature": 0.6, "top_k": 40, "top_p": 0.9,
                                      "min_p": 0.05, "repeat_penalty": 1.0}
    assert d["sampling_defaults_from_model"] == ["temperature", "top_p"]
