"""Slots: the rows of the KV cache, each recording which token ids it holds.

A slot is one sequence's row of the cache. Its `ids` are the tokens whose keys and values sit at
positions 0..len(ids)-1, kept up to date by the code that writes the cache (the Decoder), so a new
request can reuse the longest prefix it shares with what a slot already holds.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

UNKNOWN = -1  # a position written by a step whose token id has not been read back yet


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Slot:
    """A row of the KV cache and the ids written in it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.ids: list[int] = []
        self.owner: object | None = None  # who is writing it now (None: free)
        self.last_used = 0  # a counter value: the least recently used free slot is reused first

    def __len__(self) -> int:
        return len(self.ids)

    def keep_prefix(self, ids: Sequence[int]) -> int:
        """Forget everything after the longest prefix shared with `ids`, leaving at least one id
        of `ids` to prefill (its logits are needed); return how many ids are kept."""
        n = min(common_prefix(self.ids, ids), max(len(ids) - 1, 0))
        del self.ids[n:]
        return n

    def clear(self) -> None:
        """Forget what the row holds (after the cache was reallocated, say)."""
        self.ids.clear()


class SlotPool:
    """The slots of one KV cache, handed out to requests (thread-safe)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a KV cache needs at least one slot, got {n}")
        self.slots = [Slot(i) for i in range(n)]
        self._lock = threading.Lock()
        self._clock = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        """How many slots no one holds."""
        return sum(s.owner is None for s in self.slots)

    def acquire(self, ids: Sequence[int], owner: object, *, steal: bool = False) -> Slot | None:
        """A free slot for a request whose prompt is `ids`: the one sharing the longest prefix
        with it (ties: the least recently used). None when all are taken, unless `steal`: then
        the least recently started one is taken from its owner (who sees `slot.owner` change)."""
        with self._lock:
            free = [s for s in self.slots if s.owner is None]
            if not free:
                if not steal:
                    return None
                free = [min(self.slots, key=lambda s: s.last_used)]
            slot = max(free, key=lambda s: (common_prefix(s.ids, ids), -s.last_used))
            self._clock += 1
            slot.owner, slot.last_used = owner, self._clock
            return slot

    def release(self, slot: Slot, owner: object) -> None:
        """Give a slot back (a no-op when `owner` no longer holds it)."""
        with self._lock:
            if slot.owner is owner:
                slot.owner = None

    def clear(self) -> None:
        """Forget every slot's contents (the cache was reallocated or zeroed)."""
        with self._lock:
            for s in self.slots:
                s.clear()
