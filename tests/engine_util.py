"""Helpers for the generation, engine and CLI tests on the real stories260K model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llamarun.engine import Engine
from fixtures_util import require_fixture

REPO = Path(__file__).resolve().parent.parent


def stories_meta() -> Path:
    """The stories260K Meta folder (skips when the fixtures are absent)."""
    return require_fixture("stories260K", "meta")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """A 260K-parameter model runs fastest on one thread (two spin against each other when busy)."""
    before, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the CLI's default --threads, for CliRunner tests
    yield
    torch.set_num_threads(before)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def engine(one_thread: None) -> Engine:
    """stories260K on CPU in float32, loaded once per module."""
    return Engine.load(stories_meta(), device="cpu", dtype="float32")


def run_cli(*args: str, input: str | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m llamarun ARGS` in a real subprocess, single-threaded."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("LLAMARUN_MODEL", None)
    return subprocess.run([sys.executable, "-m", "llamarun", *args], input=input, text=True,
                          capture_output=True, timeout=timeout, env=full_env, cwd=REPO)
