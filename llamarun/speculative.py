"""Speculative decoding: drafts that the target model checks several at a time.

A drafter proposes up to k next tokens for a generating row; the scheduler writes the row's last
token and the drafts in one verification row (k + 1 tokens, one forward pass: on a CPU, where a
step streams every weight once, checking k tokens costs about what one costs) and keeps the
longest run the target agrees with, plus one token of its own (the correction at the first
disagreement, or a bonus after a run accepted whole). Two drafters:

- `PromptLookup` (no second model): the continuation of the most recent earlier occurrence of the
  text's last n-gram (n from `ngram` down to 1), as transformers' prompt-lookup decoding and
  llama.cpp's lookup decoding do: cheap, and strong where the output copies its input (rewriting,
  summarizing, editing code).
- `DraftModel`: a smaller model with the same vocabulary (or the same model stored smaller)
  decodes k tokens ahead in its own KV cache, whose slots its own CacheManager keeps (the same
  rules as the target's: each row's draft slot is cut back to the prefix the target accepted).

Exactness (`accept`): greedy rows keep a draft token only where it is the target's argmax, so the
output is the plain greedy output token for token. Sampled rows use the accept/reject rule of
Leviathan et al. (2023): draft token d, drawn from q, is kept with probability min(1, p(d)/q(d));
at the first rejection the token is drawn from the residual max(p - q, 0) renormalised; after a
run accepted whole the bonus token is drawn from p. The output then follows the target's
(filtered) distribution p exactly, whatever q is; a lookup draft is a q concentrated on one token.

Each row adapts its draft length to what it gets accepted (+1 after a run accepted whole, -1
otherwise, at most `draft_tokens`), and a row whose drafts keep failing (4 verifications in a row
keeping nothing) pauses drafting for 4 steps, then twice as long each time (up to 256 steps), so
a drafter that never agrees costs little. A draft model's tokens cost passes of their own, so
its rows back off faster (measured: lookup's speed-up halved under the faster rule, a rejected
draft model's overhead went from 14% to 4%): after a verification keeping nothing they draft one
token at a time, and after a pause one more miss pauses them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llamarun.cache_manager import CacheManager, Slot
from llamarun.errors import InvalidArgumentError
from llamarun.sampling import SamplingParams, greedy, logits_to_probs, multinomial

if TYPE_CHECKING:
    from llamarun.runner import Runner

DEFAULT_DRAFT_TOKENS = 4  # most tokens drafted per step (see README: chosen by measurement)
DEFAULT_LOOKUP_NGRAM = 3
MAX_DRAFT_TOKENS = 32
MAX_LOOKUP_NGRAM = 16
_MISSES_BEFORE_PAUSE = 4  # verifications in a row accepting nothing before a row pauses
_FIRST_PAUSE = 4  # steps; each pause after it (one more miss) is twice as long
_MAX_PAUSE = 256  # steps
_ALL_LOGITS = 8  # a draft model's catch-up of at most this many tokens computes every logit


@dataclass(frozen=True)
class SpecConfig:
    """How to speculate: up to `draft_tokens` drafted tokens per step, from a draft model (given
    to Speculator) or, with `lookup` N, from prompt lookup over n-grams of up to N tokens."""

    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    lookup: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidArgumentError(
                f"--draft-tokens must be between 1 and {MAX_DRAFT_TOKENS}, got {self.draft_tokens}")
        if self.lookup is not None and not 1 <= self.lookup <= MAX_LOOKUP_NGRAM:
            raise InvalidArgumentError(
                f"--lookup must be between 1 and {MAX_LOOKUP_NGRAM}, got {self.lookup}")


@dataclass
class RowState:
    """One generating request's speculation: its draft length, pause and counts."""

    k: int
    slot: Slot | None = None  # its draft model's slot (None: prompt lookup)
    lookup: _NgramIndex | None = None
    drafted: int = 0  # draft tokens proposed to the target
    accepted: int = 0  # ... of which the target kept
    misses: int = 0  # verifications in a row that kept nothing
    paused: int = 0  # steps left without drafting
    pause: int = _FIRST_PAUSE  # the next pause's length


@dataclass
class Draft:
    """A row's proposal: token ids and, for sampled drafts of a draft model, the distribution
    each was drawn from (k, vocab); None for tokens proposed with certainty."""

    ids: list[int]
    q: torch.Tensor | None = None


class _NgramIndex:
    """Where each n-gram (n = 1..size) of a growing id list last occurred, followed by at least
    one more id: the continuation to propose when the list ends with that n-gram again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ids: list[int] = []
        self.starts: dict[tuple[int, ...], int] = {}  # n-gram -> where its continuation starts

    def extend(self, ids: Sequence[int]) -> None:
        """Take ids beyond those seen (`ids` starts with everything seen so far)."""
        for token in ids[len(self.ids):]:
            self.ids.append(token)
            end = len(self.ids) - 1  # the n-grams ending before the new id continue with it
            for n in range(1, min(self.size, end) + 1):
                self.starts[tuple(self.ids[end - n:end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to k ids following the latest earlier occurrence of the longest suffix n-gram."""
        ids = self.ids
        for n in range(min(self.size, len(ids)), 0, -1):
            start = self.starts.get(tuple(ids[len(ids) - n:]))
            if start is not None:
                return ids[start:start + k]
        return []


class DraftModel:
    """A draft model's runner and the slots of its KV cache (one per target slot)."""

    def __init__(self, runner: Runner, cache: CacheManager) -> None:
        self.runner = runner
        self.cache = cache
        self.use_compiled = False  # its one-token passes run compiled graphs (switched when idle)


class Speculator:
    """Drafts for the scheduler's generating rows (see the module's docstring)."""

    def __init__(self, config: SpecConfig, draft: DraftModel | None = None) -> None:
        if (draft is None) == (config.lookup is None):
            raise InvalidArgumentError("speculation needs exactly one of a draft model and --lookup")
        self.config = config
        self.draft = draft
        self.drafted = 0  # totals over every request (statistics)
        self.accepted = 0
        self.verify_passes = 0

    @property
    def kind(self) -> str:
        """"draft model" or "prompt lookup"."""
        return "draft model" if self.draft is not None else "prompt lookup"

    def admit(self, prompt: Sequence[int], owner: object) -> RowState:
        """A new generating row's state (its draft slot taken now: there is one per target slot,
        so one is always free when the target's was)."""
        state = RowState(k=self.config.draft_tokens)
        if self.draft is not None:
            state.slot = self.draft.cache.acquire(prompt, owner)
            assert state.slot is not None, "the draft cache has a slot per target slot"
        else:
            assert self.config.lookup is not None
            state.lookup = _NgramIndex(self.config.lookup)
        return state

    def release(self, state: RowState, owner: object) -> None:
        if state.slot is not None and self.draft is not None:
            self.draft.cache.release(state.slot, owner)

    def wants(self, state: RowState) -> bool:
        """Whether the row drafts this step (False while it pauses: counts the step)."""
        if state.paused > 0:
            state.paused -= 1
            return False
        return True

    def propose(self, rows: Sequence[tuple[RowState, list[int], int, SamplingParams,
                                           torch.Generator | None]]) -> list[Draft]:
        """Drafts for rows (state, ids so far, most tokens to draft, sampling, generator); `ids`
        ends with the row's last token, which its verification row writes first."""
        if self.draft is None:
            out = []
            for state, ids, limit, _, _ in rows:
                assert state.lookup is not None
                state.lookup.extend(ids)
                out.append(Draft(state.lookup.propose(min(state.k, limit)) if limit > 0 else []))
            return out
        return self._draft_model(rows)

    def _draft_model(self, rows: Sequence[tuple[RowState, list[int], int, SamplingParams,
                                                torch.Generator | None]]) -> list[Draft]:
        from llamarun.runner import Write

        assert self.draft is not None
        draft = self.draft
        wanted = [min(state.k, limit) for state, _, limit, _, _ in rows]
        drafts = [Draft([], None) for _ in rows]
        qs: list[list[torch.Tensor]] = [[] for _ in rows]
        active = [i for i, n in enumerate(wanted) if n > 0]
        writes = []
        for i in active:
            slot = rows[i][0].slot
            assert slot is not None
            ids = rows[i][1]
            kept = draft.cache.keep_prefix(slot, ids)  # what the target rejected goes
            new = ids[kept:]
            # A few tokens (the last draft the target kept, and its own token) with every
            # logit: the compiled verification graphs serve that pass; a long catch-up (a
            # prompt) only the last.
            short = 2 <= len(new) <= _ALL_LOGITS
            writes.append(Write(slot, new, (0, len(new)) if short else (len(new) - 1, len(new))))
        first = True
        while active:
            logits = draft.runner.run(writes, compiled=draft.use_compiled)
            if first:  # only each row's last logits
                ends = torch.tensor([w.logits[1] - w.logits[0] for w in writes]).cumsum(0) - 1
                logits = logits[ends.to(logits.device)]
                first = False
            picks: list[torch.Tensor] = []
            for j, i in enumerate(active):
                _, _, _, params, generator = rows[i]
                if params.is_greedy:
                    picks.append(greedy(logits[j]))
                else:
                    q = logits_to_probs(logits[j], temperature=params.temperature,
                                        top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
                    assert generator is not None
                    picks.append(multinomial(q, generator))
                    qs[i].append(q)
            ids = torch.stack(picks).tolist()  # one read-back per draft pass
            still, writes = [], []
            for j, i in enumerate(active):
                drafts[i].ids.append(ids[j])
                if len(drafts[i].ids) < wanted[i]:
                    still.append(i)
                    slot = rows[i][0].slot
                    assert slot is not None
                    writes.append(Write.last(slot, [ids[j]]))
            active = still
        for i, d in enumerate(drafts):
            if qs[i]:
                d.q = torch.stack(qs[i])
        return drafts

    def update(self, state: RowState, drafted: int, accepted: int) -> None:
        """Count a verification and adapt the row's draft length and pause."""
        state.drafted += drafted
        state.accepted += accepted
        self.drafted += drafted
        self.accepted += accepted
        if not self.config.adaptive or drafted == 0:
            return
        if accepted == drafted:
            state.k = min(state.k + 1, self.config.draft_tokens)
        elif accepted or self.draft is None:
            state.k = max(state.k - 1, 1)
        else:  # a draft model's tokens cost passes: after a total miss, draft one at a time
            state.k = 1
        if accepted:
            state.misses = 0
            state.pause = _FIRST_PAUSE
            return
        state.misses += 1
        if state.misses >= _MISSES_BEFORE_PAUSE:
            state.paused = state.pause
            state.pause = min(state.pause * 2, _MAX_PAUSE)
            if self.draft is None:  # lookup drafts are free: another full run of misses first
                state.misses = 0
            # (a draft model's row pauses again after one more miss: reset only by an acceptance)


def accept(logits: torch.Tensor, draft: Draft, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, int]:
    """(how many draft tokens to keep, the token that follows them) given the target's logits
    (len(draft.ids) + 1, vocab) after the row's last token and after each draft token."""
    k = len(draft.ids)
    if params.is_greedy:
        best = greedy(logits).tolist()
        n = 0
        while n < k and best[n] == draft.ids[n]:
            n += 1
        return n, best[n]
    assert generator is not None
    p = logits_to_probs(logits, temperature=params.temperature, top_k=params.top_k,
                        top_p=params.top_p, min_p=params.min_p)  # (k + 1, vocab)
    if k == 0:
        return 0, int(multinomial(p[0], generator))
    ids = torch.tensor(draft.ids, dtype=torch.long, device=p.device)
    rows = torch.arange(k, device=p.device)
    pd = p[rows, ids]
    qd = draft.q[rows, ids] if draft.q is not None else torch.ones_like(pd)
    r = torch.rand(k, generator=generator, device=p.device, dtype=pd.dtype)
    kept = (r * qd < pd).tolist()  # r < p/q, without dividing by a q of 0
    n = kept.index(False) if False in kept else k
    if n == k:
        return k, int(multinomial(p[k], generator))
    if draft.q is not None:
        residual = (p[n] - draft.q[n]).clamp(min=0)
    else:  # q is all on the draft token: the residual is p without it
        residual = p[n].clone()
        residual[ids[n]] = 0
    if not bool(residual.sum() > 0):  # p == q exactly: any token of p will do
        residual = p[n]
    return n, int(multinomial(residual, generator))


def check_vocab(target: int, draft: int) -> None:
    """A draft model must share the target's vocabulary."""
    if target != draft:
        raise InvalidArgumentError(
            f"the draft model's vocabulary has {draft} tokens but the target's has {target}: "
            "a draft model must use the same tokenizer")

