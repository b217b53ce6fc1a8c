"""Sampling as pure functions over logits: penalties, temperature, top-k, top-p, min-p, draws.

Nothing here reads a tensor back to the host but top-p without top-k (one read-back, see
`_most_likely`): `sample` returns a device tensor, so a decode loop only synchronises when it
needs the token id (to stream it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from llamarun import kernels
from llamarun.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 is greedy (argmax); 0/1.0/0.0 disable top_k/top_p/min_p."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens seen in the last repeat_last_n
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at (0 = the whole context)
    seed: int | None = None  # None draws a fresh seed per run

    def __post_init__(self) -> None:
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidArgumentError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not _finite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise InvalidArgumentError(
                f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty}")
        if (isinstance(self.repeat_last_n, bool) or not isinstance(self.repeat_last_n, int)
                or self.repeat_last_n < 0):
            raise InvalidArgumentError(f"repeat_last_n must be an integer >= 0, got {self.repeat_last_n}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidArgumentError(f"seed must be an integer in [0, 2**63), got {self.seed}")

    @classmethod
    def greedy(cls) -> SamplingParams:
        """Always the most likely token (deterministic, no filters)."""
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)

    @property
    def is_greedy(self) -> bool:
        """Whether sampling reduces to argmax."""
        return self.temperature == 0 or self.top_k == 1


def _finite(x: float) -> bool:
    """A real number a float can hold (an int past float's range, 10**400, is not: it would
    overflow wherever it is used)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def apply_repeat_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive (multiply negative) logits of tokens in `recent`.

    logits (..., vocab) float; recent (n,) long token ids, duplicates allowed.
    """
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    index = recent.expand(*logits.shape[:-1], recent.shape[-1])  # (..., n)
    seen = logits.gather(-1, index)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    # An extreme penalty (1e-300, 1e300) would give inf or -inf for every seen token, and a row
    # of infinities has no softmax: keep the penalised logits finite.
    big = torch.finfo(seen.dtype).max
    seen = seen.clamp(-big, big)
    return logits.scatter(-1, index, seen)  # duplicates write the same value


class LogitsProcessor(Protocol):
    """Changes the logits before sampling; told each sampled token (to keep its own state)."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...

    def push(self, token: torch.Tensor) -> None: ...


class RepeatPenalty:
    """The repetition penalty as a logits processor over the last `last_n` ids (0: all of them),
    kept on the device: nothing is read back to the host."""

    def __init__(self, penalty: float, last_n: int, history: Sequence[int],
                 device: torch.device) -> None:
        self.penalty = penalty
        self.window = last_n or None
        recent = list(history)[-self.window:] if self.window else list(history)
        self.recent = torch.tensor(recent, dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_repeat_penalty(logits, self.recent, self.penalty)

    def push(self, token: torch.Tensor) -> None:
        self.recent = torch.cat([self.recent, token.view(1)])
        if self.window and self.recent.shape[0] > self.window:
            self.recent = self.recent[-self.window:]


class Constraint(Protocol):
    """What a request's output must match (a JSON schema, a grammar): it makes a fresh logits
    processor per request, which masks the tokens that cannot come next and is told each token
    sampled (see llamarun.scheduler: constrained and free requests share a batch)."""

    def processor(self, device: torch.device) -> LogitsProcessor: ...


def logits_processors(params: SamplingParams, history: Sequence[int],
                      device: torch.device) -> list[LogitsProcessor]:
    """The processors `params` asks for, primed with the ids so far (prompt included)."""
    out: list[LogitsProcessor] = []
    if params.repeat_penalty != 1.0:
        out.append(RepeatPenalty(params.repeat_penalty, params.repeat_last_n, history, device))
    return out


def candidates(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens that survive temperature, then top-k, top-p and min-p filtering, with their
    probabilities: (ids (..., n), probs (..., n)), or (None, probs (..., vocab)) when every token
    is a candidate. Dropped candidates have probability 0; each filter renormalises.

    top-k keeps exactly the k most likely tokens (as llama.cpp's sampler: ties at the k-th are
    broken by torch.topk's order); top-p keeps the smallest set of most likely tokens whose mass
    reaches top_p; min-p drops tokens less likely than min_p times the most likely one. Only
    top-p without top-k needs the tokens in order, and then only the most likely ones: the
    filters cost a partial sort of a few candidates, not a sort of the vocabulary.
    """
    if temperature <= 0:
        raise InvalidArgumentError("sampling needs temperature > 0 (use argmax for greedy)")
    # Legal but degenerate temperatures must not make NaN: subtracting the row's maximum first
    # (softmax does not change) keeps every quotient <= 0, and the clamp keeps the divisor a
    # float32 (1e-300 would round to 0, 1e300 to inf) without changing the probabilities of
    # logits of ordinary size: past the bounds they are one-hot or uniform already.
    logits = logits.float()
    logits = logits - logits.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    logits = logits / min(max(temperature, _MIN_TEMPERATURE), _MAX_TEMPERATURE)
    vocab = logits.shape[-1]
    ids: torch.Tensor | None = None
    if 0 < top_k < vocab:
        logits, ids = torch.topk(logits, top_k, dim=-1)  # most likely first
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        if ids is None:
            probs, ids = _most_likely(probs, top_p)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # never drops the first token
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p > 0.0:
        threshold = min_p * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return ids, probs


def _most_likely(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of each row most likely first, enough of them for top-p at `mass`: the 256 or
    4,096 most likely where that suffices (one read-back to check), else the whole vocabulary.

    The k most likely suffice when the k-th already has `mass` before it: top-p drops it, and
    every later token, whose mass before is no smaller.
    """
    vocab = probs.shape[-1]
    for k in (256, 4096):
        if k >= vocab:
            break
        top, ids = torch.topk(probs, k, dim=-1)
        if bool(((top.sum(-1) - top[..., -1]) >= mass).all()):
            return top, ids
    return torch.sort(probs, dim=-1, descending=True)


def logits_to_probs(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> torch.Tensor:
    """Probabilities (..., vocab) after temperature, then top-k, top-p and min-p filtering (see
    `candidates`), 0 for every dropped token."""
    ids, probs = candidates(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p)
    if ids is None:
        return probs
    return torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device).scatter_(-1, ids, probs)


_MIN_TEMPERATURE = 1e-30  # below it, the most likely token(s) get all the mass anyway
_MAX_TEMPERATURE = 1e30  # above it, the distribution is uniform to float32 precision anyway


def multinomial(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs (..., n) without a host sync: the first index whose cumulative
    probability reaches u times the row's total, u uniform in (0, 1] (one random number a row;
    float64 sums, so that tokens of tiny probability keep their share). A token of probability
    0 is never drawn: its cumulative sum equals its predecessor's, which comes first."""
    cum = probs.double().cumsum(-1)
    u = 1.0 - torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device,
                         dtype=torch.float64)
    pick = torch.searchsorted(cum, u * cum[..., -1:]).squeeze(-1)
    return pick.clamp_(max=probs.shape[-1] - 1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest logit over the last dim (the first where several tie), as
    torch.argmax: by llamarun's kernel where it serves (float32 on CPU: kernels.argmax), else by
    max(dim), which computes the same index 2.7-3x faster than argmax on CPU (a 49,152- or
    128,256-entry float32 row: 63 -> 23 us, 159 -> 52 us; 2 threads, Intel Xeon)."""
    ids = kernels.argmax(logits)
    return ids if ids is not None else logits.max(dim=-1).indices


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           *, recent: torch.Tensor | None = None) -> torch.Tensor:
    """The next token id(s) (...,) long for logits (..., vocab), on the logits' device.

    recent holds the ids the repetition penalty looks at; generator is required unless greedy.
    """
    if recent is not None:
        logits = apply_repeat_penalty(logits, recent, params.repeat_penalty)
    if params.is_greedy:
        return greedy(logits)
    if generator is None:
        raise InvalidArgumentError("sampling with temperature > 0 needs a torch.Generator")
    ids, probs = candidates(logits, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, min_p=params.min_p)
    pick = multinomial(probs, generator)
    return pick if ids is None else ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The generator sampling with `params` needs on `device` (None when greedy)."""
    return None if params.is_greedy else make_generator(device, params.seed)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device`, seeded with `seed` or, when None, from fresh OS entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
