"""llamarun.memory_read: the plain memory read `bench --memory-read` and benchmarks/compare.py
compare a decode's weight stream with."""

from __future__ import annotations

import pytest
import torch

from llamarun import hugepages, memory_read


def test_rates_are_bytes_over_median_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    # a clock that moves 0.25 s between a timed read's start and its end, and 1 s elsewhere:
    # every median is 0.25 s whatever form, so each rate is nbytes / 0.25 s
    ticks = iter(x for i in range(1000) for x in (10.0 * i, 10.0 * i + 0.25))
    monkeypatch.setattr(memory_read.time, "perf_counter", lambda: next(ticks))
    read = memory_read.measure("cpu", nbytes=(4 << 20) + 5, reps=3)
    assert read.nbytes == 4 << 20  # whole float32 pairs
    assert read.gb_s == pytest.approx((4 << 20) / 0.25 / 1e9)
    assert read.plain_gb_s == pytest.approx(read.gb_s)
    huge = hugepages.serves(torch.empty(1))
    assert read.form == "dot, 4 KiB pages"  # the first of equal rates
    assert huge or "huge" not in read.form


def test_best_form_and_plain_rate() -> None:
    read = memory_read.measure("cpu", nbytes=8 << 20, reps=2)
    name, _, where = read.form.partition(", ")
    assert name in ("dot", "sum") and where in ("4 KiB pages", "huge pages")
    assert 0 < read.plain_gb_s <= read.gb_s
    if where == "4 KiB pages":
        assert read.plain_gb_s == read.gb_s


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        memory_read.measure("cpu", nbytes=4)
    with pytest.raises(ValueError):
        memory_read.measure("cpu", nbytes=1 << 20, reps=0)
