"""Sliding-window perplexity of a model on a token sequence (Hugging Face's fixed-length recipe).

Windows of `ctx` tokens advance by `stride`; each window scores only the tokens no earlier window
scored, so with stride < ctx every scored token (after the first window) sees at least
ctx - stride tokens of context. Each window starts at position 0, overwriting the KV cache.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamarun.errors import InvalidArgumentError
from llamarun.model import Transformer

# Rows of logits turned into log-probabilities at once: bounds the float32 temporaries of the
# log-softmax to _ROWS x vocab (128 MiB for a 128K vocabulary).
_ROWS = 256


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


def perplexity(model: Transformer, ids: Sequence[int], *, ctx: int, stride: int | None = None,
               max_tokens: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity of `model` on `ids` (the first max_tokens of them, if given).

    stride defaults to ctx // 2. progress(done, total) is called after each window with the
    number of ids covered so far. The model's KV cache is overwritten.
    """
    if max_tokens is not None and max_tokens < 2:
        raise InvalidArgumentError(f"max_tokens must be at least 2, got {max_tokens}")
    ids = [int(i) for i in (ids if max_tokens is None else ids[:max_tokens])]
    stride = max(ctx // 2, 1) if stride is None else stride
    check_settings(len(ids), ctx=ctx, stride=stride, max_seq_len=model.max_seq_len)
    vocab = model.args.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise InvalidArgumentError(
            f"token ids must lie in [0, {vocab}), got {min(ids)}..{max(ids)}")
    device = model.positions.device
    tokens = torch.tensor(ids, dtype=torch.long, device=device)  # (N,)
    windows = plan_windows(len(ids), ctx=ctx, stride=stride)
    nll_sum = 0.0
    n_scored = 0
    processed = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            nll_sum += _window_nll(model, tokens, w)
            n_scored += w.end - w.first
            processed += w.end - w.begin
            if progress is not None:
                progress(w.end, len(ids))
    seconds = time.perf_counter() - start
    nll = nll_sum / n_scored
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, n_tokens_scored=n_scored, n_windows=len(windows),
        ctx=ctx, stride=stride, seconds=seconds,
        tokens_per_s=processed / seconds if seconds > 0 else 0.0)


def _window_nll(model: Transformer, tokens: torch.Tensor, w: Window) -> float:
    """Summed NLL (nats) of tokens[w.first:w.end] given the window's earlier tokens."""
    length = w.end - w.begin
    # Logit row j predicts token j + 1: only the rows before scored tokens are computed.
    rows = torch.arange(w.first - w.begin - 1, length - 1, device=tokens.device)
    logits = model(tokens[None, w.begin:w.end], model.positions[:length], output_idx=rows,
                   kv_len=length)[0]  # (n_scored, vocab), float32
    targets = tokens[w.first:w.end]
    total = 0.0  # summed on the host in float64: one float32 sum per chunk of rows
    for i in range(0, len(targets), _ROWS):
        total += float(F.cross_entropy(logits[i:i + _ROWS], targets[i:i + _ROWS], reduction="sum"))
    return total
