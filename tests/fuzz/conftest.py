"""The fuzz suite's summary line: how many cases ran, by target and ending."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, worker


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    from harness import TALLY

    if TALLY:
        total = sum(TALLY.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(TALLY.items()))
        terminalreporter.write_line(f"fuzz: {total} cases ({parts})")
