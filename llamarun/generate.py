"""The token loop: prefill what a slot lacks of the prompt, then sample and step one token at a time.

This module knows nothing of text: ids in, ids out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llamarun.decoder import Decoder
from llamarun.sampling import LogitsProcessor, SamplingParams, logits_processors, sample
from llamarun.slots import Slot


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, its position in the cache, and optionally its log-probability."""

    id: int
    pos: int  # where the token goes in the cache (it is written there by the next step)
    logprob: float | None = None  # under the model's raw distribution (before sampling filters)


def process(logits: torch.Tensor, processors: Sequence[LogitsProcessor]) -> torch.Tensor:
    """Apply each logits processor in turn."""
    for p in processors:
        logits = p(logits)
    return logits


@torch.inference_mode()
def generate_tokens(decoder: Decoder, slot: Slot, prompt: Sequence[int], *,
                    sampling: SamplingParams, generator: torch.Generator | None,
                    max_new_tokens: int, logprobs: bool = False,
                    lookahead: bool = False) -> Iterator[TokenEvent]:
    """Prefill the part of `prompt` that `slot` lacks (it holds a prefix of it), then yield up to
    max_new_tokens sampled tokens one by one.

    Every yielded token has a cache position: the loop never yields more than the context holds.
    A token is written to the cache by the step after it, so the last yielded token is not in
    `slot.ids`. The caller decides when to stop (stop ids, stop strings) by closing the iterator.
    With `lookahead`, the next step is queued before the current token is read back, so an
    asynchronous device computes while the host streams (one extra step is wasted when the caller
    stops; that step's token is still recorded in the slot).
    """
    assert list(prompt[:len(slot.ids)]) == slot.ids, "the slot must hold a prefix of the prompt"
    pos = len(prompt)  # where the next token goes
    budget = min(max_new_tokens, decoder.max_seq_len - pos)
    if budget <= 0:
        return
    processors = logits_processors(sampling, prompt, decoder.device)

    # On an asynchronous device, read each token back through pinned memory and an event, so the
    # read waits for that token only and not for the step queued after it.
    readback = None
    if lookahead and decoder.device.type != "cpu":
        readback = (torch.empty(2, dtype=torch.float64, pin_memory=True),
                    torch.Event(device=decoder.device))

    logits = decoder.prefill(slot, prompt[len(slot.ids):])
    for i in range(budget):
        token = sample(process(logits, processors), sampling, generator)
        values = token.double().view(1)  # (1,) or (2,) with the log-probability
        if logprobs:
            values = torch.cat([values, torch.log_softmax(logits, dim=-1)[token].double().view(1)])
        if readback is not None:
            buf, ready = readback
            buf[:values.shape[0]].copy_(values, non_blocking=True)
            ready.record()
        more = i + 1 < budget
        if lookahead and more:
            logits = decoder.step([slot], token.view(1))[0]  # its id is recorded below
        if readback is not None:
            readback[1].synchronize()
            host = readback[0][:values.shape[0]].tolist()
        else:
            host = values.tolist()  # the one sync per token that streaming needs
        token_id = int(host[0])
        if lookahead and more:
            slot.ids[-1] = token_id
        yield TokenEvent(token_id, pos, host[1] if logprobs else None)
        if not more:
            return
        for p in processors:
            p.push(token)
        if not lookahead:
            logits = decoder.step([slot], token.view(1), [token_id])[0]
        pos += 1
