"""The device's plain memory read rate: the ceiling a decode step's weight stream is measured by.

A decode step reads every weight once, so its GB/s (weight bytes per token x tokens/s) over the
rate at which the same device reads memory doing nothing else says how much of the hardware the
step uses. The read is timed in two vectorized forms split over the threads (a float32 dot
product of two buffers and a sum of each), each the median of a few runs; on CPU both over
ordinary memory and over huge pages (`llamarun.hugepages`, where the weights are), the best of
them taken. The buffers are freed before returning.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamarun import hugepages
from llamarun.device import synchronize

READ_BYTES = 2**30  # larger than any cache of the machines measured (L3 up to 480 MiB)


@dataclass(frozen=True)
class MemoryRead:
    """GB/s of the fastest form (`form`, e.g. "dot, huge pages") and of the fastest form over
    ordinary memory (4 KiB pages on CPU)."""

    gb_s: float
    form: str
    plain_gb_s: float
    nbytes: int


def _buffers(nbytes: int, device: torch.device, huge: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 buffers of nbytes / 2 each, filled with ones (so resident), in huge pages
    where asked."""
    n = nbytes // 8
    if huge:
        arena = hugepages.Arena()
        return arena.empty((n,), torch.float32).fill_(1.0), arena.empty((n,), torch.float32).fill_(1.0)
    return (torch.ones(n, dtype=torch.float32, device=device),
            torch.ones(n, dtype=torch.float32, device=device))


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()  # the first touch of a form (lazy setup, page faults) is not timed
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: torch.device | str = "cpu", *, nbytes: int | None = None,
            reps: int = 5) -> MemoryRead:
    """Time the plain reads of nbytes (default READ_BYTES) on `device` (see the module's
    docstring)."""
    device = torch.device(device)
    nbytes = READ_BYTES if nbytes is None else nbytes
    if nbytes < 8 or reps < 1:
        raise ValueError("nbytes must be at least 8 and reps at least 1")
    nbytes -= nbytes % 8
    pages = ["4 KiB pages", "huge pages"] if device.type == "cpu" else ["device memory"]
    if device.type == "cpu" and not hugepages.serves(torch.empty(1)):
        pages = ["4 KiB pages"]
    rates: dict[str, float] = {}
    for where in pages:
        x, y = _buffers(nbytes, device, where == "huge pages")  # the dot reads both: nbytes
        forms = {"dot": lambda: torch.dot(x, y), "sum": lambda: x.sum() + y.sum()}
        for name, fn in forms.items():
            rates[f"{name}, {where}"] = nbytes / _median_seconds(fn, device, reps) / 1e9
        del x, y, forms
    best = max(rates, key=rates.__getitem__)
    plain = max(v for k, v in rates.items() if not k.endswith("huge pages"))
    return MemoryRead(gb_s=rates[best], form=best, plain_gb_s=plain, nbytes=nbytes)
