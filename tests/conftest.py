"""Shared pytest fixtures: tiny seeded models and checkpoint folders written from them."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when several tests spawn subprocesses.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The CLI compiles the decode step in the background by default: a compile running under every
# CLI test (in this process and in subprocesses) would slow them all. Tests of the compiled
# paths ask for it explicitly.
os.environ["LLAMARUN_COMPILE"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (torch.compile, big models)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
