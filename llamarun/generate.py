"""Token generation over a preallocated KV cache: prefill, one decode step, and the token loop.

This module knows nothing of text: ids in, ids out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llamarun.errors import PromptTooLongError
from llamarun.model import Transformer
from llamarun.sampling import SamplingParams, sample

KV_BUCKET = 256  # eager steps attend over the cache rounded up to this many slots
PREFILL_CHUNK = 512  # longer prompts are prefilled in chunks of this many tokens

# (token (1, 1) long, input_pos (1,) long, pos: the same position as a Python int) -> logits (vocab,)
DecodeStep = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, its position in the cache, and optionally its log-probability."""

    id: int
    pos: int  # where the token goes in the cache (it is written there by the next step)
    logprob: float | None = None  # under the model's raw distribution (before sampling filters)


def kv_bucket(pos: int, max_seq_len: int) -> int:
    """Cache slots to attend over for a query at `pos`: the next multiple of KV_BUCKET, capped."""
    return min(max_seq_len, (pos // KV_BUCKET + 1) * KV_BUCKET)


def prefill(model: Transformer, tokens: torch.Tensor, start_pos: int, *,
            chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Write tokens (S,) at start_pos.. into the cache; return the last position's logits (vocab,)."""
    n = tokens.shape[0]
    if n == 0:
        raise ValueError("prefill needs at least one token")
    if start_pos + n > model.max_seq_len:
        raise PromptTooLongError(f"{start_pos + n} tokens do not fit in the context of "
                                 f"{model.max_seq_len} tokens")
    logits = None
    for i in range(0, n, chunk_size):
        chunk = tokens[i:i + chunk_size]
        end = start_pos + i + chunk.shape[0]
        input_pos = model.positions[start_pos + i:end]
        last = torch.tensor([chunk.shape[0] - 1], device=tokens.device)
        logits = model(chunk[None], input_pos, output_idx=last,
                       kv_len=kv_bucket(end - 1, model.max_seq_len))
    assert logits is not None
    return logits[0, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor,
                     kv_len: int | None = None, kv_exact: bool = False) -> torch.Tensor:
    """Logits (vocab,) after feeding token (1, 1) at input_pos (1,); kv_* as in Transformer.forward."""
    return model(token, input_pos, kv_len=kv_len, kv_exact=kv_exact)[0, -1]


def eager_step(model: Transformer) -> DecodeStep:
    """A DecodeStep running the model eagerly, attending over exactly the used part of the cache.

    (Eager shapes may change every step; a compiled step attends over KV_BUCKET-rounded lengths.)
    """
    def step(token: torch.Tensor, input_pos: torch.Tensor, pos: int) -> torch.Tensor:
        return decode_one_token(model, token, input_pos, pos + 1, kv_exact=True)
    return step


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt: Sequence[int], *, start_pos: int = 0,
                    sampling: SamplingParams, generator: torch.Generator | None,
                    max_new_tokens: int, step: DecodeStep | None = None,
                    history: Sequence[int] = (), logprobs: bool = False,
                    lookahead: bool = False) -> Iterator[TokenEvent]:
    """Prefill `prompt` at start_pos, then yield up to max_new_tokens sampled tokens one by one.

    Every yielded token has a cache slot: the loop never yields more than the context holds
    (max_seq_len - start_pos - len(prompt) tokens). The caller decides when to stop (stop ids,
    stop strings) by closing the iterator. `history` holds earlier ids (already in the cache)
    for the repetition penalty. With `lookahead`, the next step is queued before the current
    token is read back, so an asynchronous device computes while the host streams (one extra
    step is wasted when the caller stops).
    """
    device = model.positions.device
    step = step or eager_step(model)
    prompt_t = torch.tensor(list(prompt), dtype=torch.long, device=device)
    pos = start_pos + prompt_t.shape[0]  # where the next token goes
    budget = min(max_new_tokens, model.max_seq_len - pos)
    if budget <= 0:
        return
    window = sampling.repeat_last_n or model.max_seq_len
    use_penalty = sampling.repeat_penalty != 1.0
    recent = torch.empty(0, dtype=torch.long, device=device)
    if use_penalty:
        earlier = torch.tensor(list(history)[-window:], dtype=torch.long, device=device)
        recent = torch.cat([earlier, prompt_t])[-window:]

    # On an asynchronous device, read each token back through pinned memory and an event, so the
    # read waits for that token only and not for the step queued after it.
    readback = None
    if lookahead and not prompt_t.is_cpu:
        readback = (torch.empty(2, dtype=torch.float64, pin_memory=True), torch.Event(device=device))

    logits = prefill(model, prompt_t, start_pos)
    input_pos = torch.tensor([pos], dtype=torch.long, device=device)
    for i in range(budget):
        token = sample(logits, sampling, generator, recent=recent if use_penalty else None)
        values = token.double().view(1)  # (1,) or (2,) with the log-probability
        if logprobs:
            values = torch.cat([values, torch.log_softmax(logits, dim=-1)[token].double().view(1)])
        if readback is not None:
            buf, ready = readback
            buf[:values.shape[0]].copy_(values, non_blocking=True)
            ready.record()
        more = i + 1 < budget
        if lookahead and more:
            logits = step(token.view(1, 1), input_pos, pos)
            input_pos += 1
        if readback is not None:
            readback[1].synchronize()
            host = readback[0][:values.shape[0]].tolist()
        else:
            host = values.tolist()  # the one sync per token that streaming needs
        yield TokenEvent(int(host[0]), pos, host[1] if logprobs else None)
        if not more:
            return
        if use_penalty:
            recent = torch.cat([recent[-(window - 1):] if window > 1 else recent[:0], token.view(1)])
        if not lookahead:
            logits = step(token.view(1, 1), input_pos, pos)
            input_pos += 1
        pos += 1
