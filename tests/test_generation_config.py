"""Sampling defaults from a checkpoint's generation_config.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llamarun.generation_config import generation_defaults


def folder(tmp_path: Path, cfg: object, *, name: str = "model") -> Path:
    path = tmp_path / name
    path.mkdir(parents=True)
    (path / "generation_config.json").write_text(json.dumps(cfg))
    return path


def test_sampling_keys_under_our_names(tmp_path: Path) -> None:
    path = folder(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50.0,
                             "min_p": 0.1, "repetition_penalty": 1.1, "eos_token_id": [1, 2],
                             "max_length": 99})
    assert generation_defaults(path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 50,
                                         "min_p": 0.1, "repeat_penalty": 1.1}


def test_do_sample_false_is_greedy(tmp_path: Path) -> None:
    path = folder(tmp_path, {"do_sample": False, "temperature": 0.7, "top_p": 0.8})
    assert generation_defaults(path) == {"temperature": 0.0, "top_p": 0.8}


def test_nothing_to_take(tmp_path: Path) -> None:
    assert generation_defaults(folder(tmp_path, {"bos_token_id": 1})) == {}
    assert generation_defaults(tmp_path / "missing") == {}
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert generation_defaults(gguf) == {}


def test_invalid_values_are_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder(tmp_path, {"temperature": -1, "top_p": 0.5, "top_k": "many"})
    monkeypatch.setattr(logging.getLogger("llamarun"), "propagate", True)  # the CLI turns it off
    with caplog.at_level(logging.WARNING, logger="llamarun"):
        assert generation_defaults(path) == {"top_p": 0.5}
    assert "temperature=-1" in caplog.text and "top_k='many'" in caplog.text
    (path / "generation_config.json").write_text("{not json")
    assert generation_defaults(path) == {}


def test_meta_original_folder_uses_the_repository_file(tmp_path: Path) -> None:
    repo = folder(tmp_path, {"temperature": 0.6}, name="repo")
    (repo / "original").mkdir()
    assert generation_defaults(repo / "original") == {"temperature": 0.6}
    (tmp_path / "other").mkdir()
    assert generation_defaults(tmp_path / "other") == {}  # a plain folder does not look up
