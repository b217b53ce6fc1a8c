"""`llamarun info` on stories260K."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import torch

from llamarun.cli import app
from llamarun.device import default_dtype
from engine_util import one_thread, stories_meta  # noqa: F401


def test_info_table(one_thread: None) -> None:
    r = CliRunner().invoke(app, ["info", "-m", str(stories_meta())], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    auto = str(default_dtype(torch.device("cpu"), torch.float32)).removeprefix("torch.")
    for text in ("meta", "292.80K", "sentencepiece", "llama2", "2 '</s>'", "config.n_kv_heads",
                 auto, f"22 {auto}"):  # 22 matrices: embedding, output, 4 per layer
        assert text in r.stdout, text


def test_info_json(one_thread: None) -> None:
    r = CliRunner().invoke(app, ["info", "-m", str(stories_meta()), "--json"],
                           env={"LLAMARUN_MODEL": None})
    d = json.loads(r.stdout)
    assert d["layout"] == "meta" and d["parameters"] == 292_800 and d["tokenizer"] == "sentencepiece"
    assert d["chat_format"] == "llama2" and d["stop_tokens"] == {"2": "</s>"}
    assert d["config"]["n_layers"] == 5 and d["kv_cache_tokens"] == 512


def test_info_hf_layout(one_thread: None) -> None:
    hf = stories_meta().parent / "hf"
    r = CliRunner().invoke(app, ["info", "-m", str(hf), "--json"], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layout"] == "hf"


def test_info_missing_model(tmp_path) -> None:  # noqa: ANN001
    r = CliRunner().invoke(app, ["info", "-m", str(tmp_path / "x")], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 1 and r.stderr.startswith("error: ")
