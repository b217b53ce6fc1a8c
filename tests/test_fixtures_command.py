"""`python -m tests.fixtures`: says what is there and where the rest comes from; skips name it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_util import require_fixture

REPO = Path(__file__).resolve().parent.parent


def test_check_reports_each_fixture_and_its_source(tmp_path: Path) -> None:
    (tmp_path / "stories260K" / "meta").mkdir(parents=True)
    env = {**os.environ, "LLAMARUN_FIXTURES": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "tests.fixtures", "--check"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"fixtures folder: {tmp_path} (set LLAMARUN_FIXTURES to use another)"
    assert "  stories260K/meta: present" in lines
    assert "  llama3-tokenizer/tokenizer.model: missing (run without --check)" in lines
    hf = next(line for line in lines if line.startswith("  stories260K/hf: "))
    assert "missing; on no package index: " in hf and "convert_llama_weights_to_hf" in hf
    assert lines[-1].startswith("4 fixture(s) missing") or lines[-1].startswith("5 fixture(s) missing")


def test_a_skip_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMARUN_FIXTURES", str(tmp_path))
    monkeypatch.delenv("LLAMARUN_REQUIRE_FIXTURES", raising=False)
    with pytest.raises(pytest.skip.Exception) as e:
        require_fixture("stories260K", "hf")
    assert "`python -m tests.fixtures`" in str(e.value)  # the command README.md names
