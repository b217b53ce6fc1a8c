"""The KV cache manager: which token ids each row (slot) of the cache holds, and who uses it.

The model holds the cache tensors and computes; it knows no slots. Everything that writes the
cache goes through a Runner, which records what it wrote here, so a slot's `ids` are always the
tokens whose keys and values sit at positions 0..len(ids)-1 of its row. A new request reuses the
longest prefix a free slot holds (prefix caching across slots, as llama.cpp's server slots and
vLLM's prefix cache do); among slots sharing nothing it takes the least recently used. A busy
slot is never taken: a request waits until one is free.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


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

    def __repr__(self) -> str:
        return f"Slot({self.index}, {len(self.ids)} ids, {'busy' if self.owner else 'free'})"


class CacheManager:
    """The slots of one KV cache (n rows of max_seq_len positions), handed out to requests.

    acquire/release are thread-safe (a server's request threads and its scheduler share them);
    the ids of a slot are written only by whoever holds it.
    """

    def __init__(self, n: int, max_seq_len: int) -> None:
        if n < 1:
            raise ValueError(f"a KV cache needs at least one slot, got {n}")
        self.slots = [Slot(i) for i in range(n)]
        self.max_seq_len = max_seq_len
        self._lock = threading.Lock()
        self._clock = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        """How many slots no one holds."""
        return sum(s.owner is None for s in self.slots)

    def acquire(self, ids: Sequence[int], owner: object) -> Slot | None:
        """A free slot for a request whose prompt is `ids`: the one sharing the longest prefix
        with it (ties: the least recently used); None when every slot is busy."""
        with self._lock:
            free = [s for s in self.slots if s.owner is None]
            if not free:
                return None
            slot = max(free, key=lambda s: (common_prefix(s.ids, ids), -s.last_used))
            self._clock += 1
            slot.owner, slot.last_used = owner, self._clock
            return slot

    def release(self, slot: Slot, owner: object) -> None:
        """Give a slot back (a no-op when `owner` does not hold it)."""
        with self._lock:
            if slot.owner is owner:
                slot.owner = None

    def keep_prefix(self, slot: Slot, ids: Sequence[int]) -> int:
        """Forget what `slot` holds after its longest prefix shared with `ids`, leaving at least
        one id of `ids` to compute (its logits are needed); return how many ids are kept."""
        n = min(common_prefix(slot.ids, ids), max(len(ids) - 1, 0))
        del slot.ids[n:]
        return n

    def truncate(self, slot: Slot, n: int) -> None:
        """Forget every position of `slot` from n on (rolled back, or never to be trusted)."""
        del slot.ids[n:]

    def record(self, slot: Slot, start: int, ids: Sequence[int]) -> None:
        """Note that `ids` were written at positions start.. of the slot's row."""
        if start != len(slot.ids):
            raise RuntimeError(f"slot {slot.index} holds {len(slot.ids)} ids; a write at "
                               f"{start} would leave a gap or overwrite them unrecorded")
        slot.ids.extend(ids)

    def clear(self) -> None:
        """Forget every slot's contents (the cache was reallocated or zeroed)."""
        with self._lock:
            for s in self.slots:
                s.ids.clear()

    def resize(self, max_seq_len: int) -> None:
        """The rows were reallocated with max_seq_len positions: everything is forgotten."""
        self.max_seq_len = max_seq_len
        self.clear()
