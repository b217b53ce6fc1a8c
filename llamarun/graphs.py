"""Decode passes replayed from CUDA graphs: one recorded per batch bucket and attention window.

A decode pass of an eager or compiled step launches some hundreds of kernels; on a GPU each
launch costs the host more than the kernel costs the device, so a small model decodes at the
speed of its Python and launch overhead. A CUDA graph launches the whole pass at once. It
replays fixed shapes and fixed addresses: the pass takes its tokens, cache rows and positions
from buffers of its own, and attends over a fixed window of its rows (runner.decode_window),
so one graph serves every position below its window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamarun.model import Transformer

log = logging.getLogger(__name__)

DecodeFn = Callable[[Transformer, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # the buffers the graph reads ...
    rows: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor  # ... and the one it writes


class GraphedDecode:
    """fn(model, tokens, rows, pos, window) -> logits (B, vocab), run through CUDA graphs.

    The first pass of a (batch size, window) runs fn directly and records its graph (unless
    can_record() says not now: another thread may be using the GPU); later
    ones copy their inputs into the graph's buffers and replay it. Recordings are dropped when
    the model's KV cache is allocated anew (their addresses would be stale). A model off CUDA
    runs every pass directly: the same shapes and windows, which tests on CPU check. A
    recording that fails (another thread using the GPU in a way capture forbids, say) is
    logged once and the passes go on without graphs.
    """

    def __init__(self, model: Transformer, fn: DecodeFn, *,
                 can_record: Callable[[], bool] | None = None) -> None:
        self.model = model
        self.fn = fn
        self.record = model.positions.device.type == "cuda"
        self.can_record = can_record  # False for now: run directly, record at a later pass
        self.graphs: dict[tuple[int, int], _Recorded] = {}
        self.failed: str | None = None
        self._cache_key: tuple[int, int] | None = None
        self._pool: tuple[int, int] | None = None  # one memory pool for every recording

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                 window: int) -> torch.Tensor:
        """Logits (B, vocab) of one pass."""
        self._check_cache()
        key = (int(tokens.shape[0]), window)
        rec = self.graphs.get(key)
        if rec is not None:
            rec.tokens.copy_(tokens)
            rec.rows.copy_(rows)
            rec.pos.copy_(pos)
            rec.graph.replay()
            return rec.logits.clone()  # the next replay overwrites the buffer
        logits = self.fn(self.model, tokens, rows, pos, window)
        if (self.record and self.failed is None
                and (self.can_record is None or self.can_record())):
            self._record(key, tokens, rows, pos, window)
        return logits

    def _check_cache(self) -> None:
        cache = self.model.layers[0].attention.kv_cache
        key = (cache.k_cache.data_ptr() if cache is not None else 0, self.model.max_seq_len)
        if key != self._cache_key:
            self.graphs.clear()
            self._cache_key = key

    def _record(self, key: tuple[int, int], tokens: torch.Tensor, rows: torch.Tensor,
                pos: torch.Tensor, window: int) -> None:
        # Recording runs nothing: the pass just computed by fn is not repeated.
        static = [t.clone() for t in (tokens, rows, pos)]
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self.fn(self.model, *static, window)
        except Exception as e:  # noqa: BLE001 (any failure: decode goes on without graphs)
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("recording a CUDA graph of the decode step failed; decoding goes on "
                        "without graphs (%s)", self.failed)
            return
        self.graphs[key] = _Recorded(graph, *static, logits)
