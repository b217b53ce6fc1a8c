"""Sliding-window perplexity of a model on a token sequence (Hugging Face's fixed-length recipe).

Windows of `ctx` tokens advance by `stride`; each window scores only the tokens no earlier window
scored, so with stride < ctx every scored token (after the first window) sees at least
ctx - stride tokens of context. Each window is a scoring request to the engine's scheduler: it
starts at position 0 of a cache slot (reusing what the slot holds of it, as any request does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

from llamarun.errors import InvalidArgumentError

if TYPE_CHECKING:
    from llamarun.engine import Engine


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with the settings and timing that produced it."""

    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood of the scored tokens, in nats
    n_tokens_scored: int
    n_windows: int
    ctx: int
    stride: int
    seconds: float
    tokens_per_s: float  # tokens run through the model (windows overlap) per second


@dataclass(frozen=True)
class Window:
    """One forward pass: ids[begin:end] at positions 0.., scoring the tokens ids[first:end]."""

    begin: int
    end: int
    first: int  # the first scored token: begin < first < end


def default_text() -> str:
    """The standard library's pydoc topics (about 460K chars of English), in sorted-key order.

    Every Python install has it, so it needs no download; it changes only between Python versions.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def plan_windows(n_tokens: int, *, ctx: int, stride: int) -> list[Window]:
    """The windows covering n_tokens ids, as in the Hugging Face perplexity guide."""
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def check_settings(n_tokens: int, *, ctx: int, stride: int, max_seq_len: int) -> None:
    """Raise InvalidArgumentError for settings perplexity() cannot use."""
    if ctx < 2:
        raise InvalidArgumentError(f"ctx must be at least 2 tokens, got {ctx}")
    if ctx > max_seq_len:
        raise InvalidArgumentError(
            f"ctx {ctx} exceeds the model's KV cache of {max_seq_len} tokens "
            "(use a smaller ctx or load the model with a larger max_seq_len)")
    if not 1 <= stride <= ctx:
        raise InvalidArgumentError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
    if n_tokens < 2:
        raise InvalidArgumentError(f"perplexity needs at least 2 tokens, got {n_tokens}")


def perplexity(engine: Engine, ids: Sequence[int], *, ctx: int, stride: int | None = None,
               max_tokens: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity of the engine's model on `ids` (the first max_tokens of them).

    stride defaults to ctx // 2. progress(done, total) is called after each window with the
    number of ids covered so far.
    """
    if max_tokens is not None and max_tokens < 2:
        raise InvalidArgumentError(f"max_tokens must be at least 2, got {max_tokens}")
    ids = [int(i) for i in (ids if max_tokens is None else ids[:max_tokens])]
    stride = max(ctx // 2, 1) if stride is None else stride
    check_settings(len(ids), ctx=ctx, stride=stride, max_seq_len=engine.max_seq_len)
    vocab = engine.args.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise InvalidArgumentError(
            f"token ids must lie in [0, {vocab}), got {min(ids)}..{max(ids)}")
    windows = plan_windows(len(ids), ctx=ctx, stride=stride)
    nll_sum = 0.0
    n_scored = 0
    processed = 0
    start = time.perf_counter()
    for w in windows:
        scored = engine.score(ids[w.begin:w.end], first=w.first - w.begin)
        nll_sum += scored.nll
        n_scored += scored.tokens
        processed += w.end - w.begin
        if progress is not None:
            progress(w.end, len(ids))
    seconds = time.perf_counter() - start
    nll = nll_sum / n_scored
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, n_tokens_scored=n_scored, n_windows=len(windows),
        ctx=ctx, stride=stride, seconds=seconds,
        tokens_per_s=processed / seconds if seconds > 0 else 0.0)
