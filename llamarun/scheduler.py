"""The scheduler: the one loop that serves every generation (chat, complete, bench, perplexity
and serve).

Requests are submitted to it and get a Ticket whose events (Token..., then a GenerationResult;
or a Scored for a perplexity window; or Failed) arrive in order. Each iteration of the loop
(`step`):
1. drops cancelled requests, freeing their slots at once;
2. admits waiting requests into free KV cache slots (the cache manager's rule: the longest shared
   prefix, then the least recently used; a busy slot is never taken), keeping the prefix the
   slot already holds;
3. runs one decode pass for every request that is generating (one token each, in one forward
   pass; compiled graphs when they are in use), samples each row with its own settings and
   hands each token on. The pass also carries the next chunk of at most `prefill_chunk` tokens
   of the first request still prefilling (chunked prefill, as vLLM's: a long prompt arriving
   while others stream delays their next tokens by a chunk's extra rows in their own pass,
   not by the whole prompt, nor by a pass of its own);
4. with nobody generating (or a perplexity window, or a speculative verification pass, in
   the way), prefills in a pass of its own: at most SOLO_PREFILL_CHUNK tokens with nobody
   generating, else `prefill_chunk`.
The loop runs in a thread of its own (the server: `start`), or is driven by whoever waits for an
event (`next_event`: the engine's synchronous generations), never both at once.

Every pass runs the same forward function, whose products treat rows independently and whose
attention is computed per sequence: a generating row's tokens do not depend on what else is in
the batch or being prefilled beside it (bit for bit in float32 on CPU), and the compiled graphs
have a small, fixed set of shapes (a bucket of decode rows, with or without one chunk).

Compiled graphs take over only when no request is running (between generations): a request's
tokens never come from two kinds of step, so a one-shot command gives the same tokens whether
or not a compile finished meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llamarun.cache_manager import CacheManager, Slot
from llamarun.device import release_cpu_worker_threads
from llamarun.errors import InvalidArgumentError, LlamarunError, PromptTooLongError
from llamarun.generation import (
    FINAL, Event, Failed, GenerationResult, Reply, Scored, TextChunk, Token,
)
from llamarun.runner import Runner, Write
from llamarun.sampling import (
    Constraint, LogitsProcessor, SamplingParams, generator_for, greedy, logits_processors, sample,
)
from llamarun.speculative import Draft, RowState, Speculator, accept
from llamarun.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Prompt tokens per iteration while others generate, in their decode pass: the largest chunk
# that kept streams' inter-token p99 within 3x their p50 while a 2,048-token prompt arrived
# (benchmarks/serve_load.py --long-prompt, README "Speed"); 16 and 64 prefill it 1.4x and 2.3x
# faster at 6x and 9x.
DEFAULT_PREFILL_CHUNK = 8
SOLO_PREFILL_CHUNK = 512  # ... and while nobody does


class QueueFull(LlamarunError):
    """The scheduler's queue of waiting requests is full."""


class Stopped(LlamarunError):
    """The scheduler is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Request:
    """What to generate: prompt ids, sampling and limits.

    top_logprobs: None for no log-probabilities; k for the token's and the top k. reuse=False
    computes the whole prompt even where a slot holds it. stop_ids=False: the tokenizer's stop
    ids do not end it (benchmarks); text=False streams ids without detokenizing. score_from: a scoring request
    (perplexity): no tokens are generated; the result is the summed negative log-likelihood of
    prompt[score_from:] given what precedes each token. constraint: what the output must match
    (its processor masks each row's logits before the sampling settings apply). speculate=False:
    never drafted for, even when the scheduler speculates.
    """

    prompt: Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams.greedy)
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    reuse: bool = True
    score_from: int | None = None
    stop_ids: bool = True
    text: bool = True
    constraint: Constraint | None = None
    speculate: bool = True


class Ticket:
    """A submitted request. Its events go to `on_event` (called from the loop's thread), or
    queue up for next_event() when there is none."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None) -> None:
        self.request = request
        self.on_event = on_event
        self.events: deque[Event] = deque()
        self.cancelled = threading.Event()
        self.done = False  # its final event has been sent

    def cancel(self) -> None:
        """Stop generating for this request; its slot is freed at the loop's next iteration."""
        self.cancelled.set()


@dataclass
class _Active:
    ticket: Ticket
    slot: Slot
    reply: Reply | None  # None for a scoring request
    generator: torch.Generator | None
    processors: list[LogitsProcessor]
    budget: int  # tokens this request may still sample (context and max_new_tokens)
    reused: int
    start: float
    pending: list[int]  # prompt ids not yet written to the cache
    token: int = -1  # the last sampled id (written by the next decode pass)
    first: float = 0.0
    last: float = 0.0
    nll: float = 0.0
    scored: int = 0
    spec: RowState | None = None  # its speculation, when it drafts
    steps: int = 0  # decode or verification passes it took part in


class Scheduler:
    """Serves every request submitted to it, in batches (see the module's docstring)."""

    def __init__(self, runner: Runner, cache: CacheManager, tokenizer: Tokenizer, *,
                 max_queue: int = 64, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if prefill_chunk < 1:
            raise InvalidArgumentError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.runner = runner
        self.cache = cache
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.device = runner.device
        self._waiting: deque[Ticket] = deque()
        self._prefilling: list[_Active] = []
        self._decoding: list[_Active] = []
        self._cond = threading.Condition()
        self._drive = threading.RLock()  # one driver of the loop at a time
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._users = 0  # start() calls not yet stopped
        self.use_compiled = False  # decode passes run the compiled graphs (switched when idle)
        self.steps = 0  # decode passes run (for statistics)
        self.batched_rows = 0  # rows in them
        self.prefill_passes = 0
        self.speculator: Speculator | None = None  # drafts for generating rows (speculative.py)

    # -- submitting ------------------------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None, *,
               max_queue: int | None = None) -> Ticket:
        """Queue a request. Raises InvalidArgumentError/PromptTooLongError for one that cannot
        run, QueueFull when max_queue (default: the scheduler's) requests wait already,
        Stopped when shutting down."""
        n = len(request.prompt)
        if n == 0:
            raise InvalidArgumentError("the prompt has no tokens")
        if request.score_from is None:
            if request.max_new_tokens < 1:
                raise InvalidArgumentError(
                    f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
            if n >= self.runner.max_seq_len:
                raise PromptTooLongError(
                    f"the prompt has {n} tokens but the context holds {self.runner.max_seq_len}; "
                    f"shorten it or raise --max-seq-len")
        elif not 1 <= request.score_from < n or n > self.runner.max_seq_len:
            raise InvalidArgumentError(f"cannot score from {request.score_from} in {n} tokens "
                                       f"(context {self.runner.max_seq_len})")
        ticket = Ticket(request, on_event)
        with self._cond:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._waiting) >= (self.max_queue if max_queue is None else max_queue):
                raise QueueFull(f"{len(self._waiting)} requests are waiting already; retry later")
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    def next_event(self, ticket: Ticket) -> Event:
        """The ticket's next event, driving the loop in this thread when no thread runs it."""
        while True:
            with self._cond:
                if ticket.events:
                    return ticket.events.popleft()
                if self.running:
                    self._cond.wait(0.05)
                    continue
            with self._drive:
                if not ticket.events and not self.running:
                    self.step()

    @property
    def running(self) -> bool:
        """Whether the loop runs in a thread of its own (start)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        return len(self._prefilling) + len(self._decoding), len(self._waiting)

    # -- the loop in a thread --------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a thread of its own until stop() (calls nest: each start() needs
        its stop(); the loop ends at the last one)."""
        with self._cond:
            self._users += 1
            if self.running:
                return
            self._stopping = False  # a stopped scheduler may serve again (a new app)
        # From now on the loop's thread computes: the caller's idle CPU worker threads would
        # only slow each of its parallel ops (device.release_cpu_worker_threads).
        if self.device.type == "cpu":
            release_cpu_worker_threads()
        self._thread = threading.Thread(target=self._loop, name="llamarun-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is waiting or running and end the thread (at the last of nested starts)."""
        with self._cond:
            self._users = max(self._users - 1, 0)
            if self._users:
                return
            self._stopping = True
            for t in self._waiting:
                t.cancel()
            for a in [*self._prefilling, *self._decoding]:
                a.ticket.cancel()
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._prefilling or self._decoding or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._prefilling or self._decoding):
                    return
            with self._drive:
                self.step()

    # -- one iteration ---------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration of the loop (see the module's docstring)."""
        self._leave_cancelled()
        idle = not (self._prefilling or self._decoding)
        if idle and not self.use_compiled and self.runner.compiled_ready:
            self.use_compiled = True  # between generations: no request sees two kinds of step
        draft = self.speculator.draft if self.speculator is not None else None
        if idle and draft is not None and not draft.use_compiled and draft.runner.compiled_ready:
            draft.use_compiled = True
        self._admit()
        mixed = self.prefill_passes
        if self._decoding:
            self._decode()  # carrying a prompt chunk where one can share the pass
        if self._prefilling and self.prefill_passes == mixed:
            self._prefill()

    def _leave_cancelled(self) -> None:
        with self._cond:
            waiting = [t for t in self._waiting if t.cancelled.is_set()]
            for t in waiting:
                self._waiting.remove(t)
        for t in waiting:
            self._send(t, [self._result(t, "cancelled")])
        for a in [a for a in (*self._prefilling, *self._decoding) if a.ticket.cancelled.is_set()]:
            self._finish(a, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or self.cache.free == 0:
                    return
                ticket = self._waiting.popleft()
            req = ticket.request
            slot = self.cache.acquire(req.prompt, ticket)
            assert slot is not None
            if not req.reuse:
                self.cache.truncate(slot, 0)
            scoring = req.score_from is not None
            # A scoring request recomputes every position whose logits it needs.
            keep = req.prompt[:req.score_from] if scoring else req.prompt
            reused = self.cache.keep_prefix(slot, keep)
            prompt = list(req.prompt)
            a = _Active(
                ticket=ticket, slot=slot,
                reply=None if scoring else Reply(self.tokenizer, stop=req.stop,
                                                  max_new_tokens=req.max_new_tokens,
                                                  stop_ids=req.stop_ids, text=req.text),
                generator=None if scoring else generator_for(req.sampling, self.device),
                processors=[] if scoring else _processors(req, prompt, self.device),
                budget=min(req.max_new_tokens, self.runner.max_seq_len - len(prompt)),
                reused=reused, start=time.perf_counter(), pending=prompt[reused:])
            if (self.speculator is not None and not scoring and req.speculate
                    and not a.processors and req.top_logprobs is None):
                a.spec = self.speculator.admit(prompt, ticket)
            self._prefilling.append(a)

    def _decode(self) -> None:
        batch = list(self._decoding)
        if (self.speculator is not None and all(a.spec is not None for a in batch)
                and self._verify(batch)):
            return
        writes = [Write.last(a.slot, [a.token]) for a in batch]
        chunk = self._chunk_to_mix()
        if chunk is not None:
            writes.append(chunk[1])
        _prepare(batch + ([chunk[0]] if chunk is not None and chunk[2] else []))
        try:
            logits = self.runner.run(writes, compiled=self.use_compiled)
        except Exception as e:  # one failed pass ends its rows, not the loop
            log.exception("decode pass failed")
            for a in batch + ([chunk[0]] if chunk is not None else []):
                self.cache.truncate(a.slot, 0)  # what the failed pass left is unknown
                self._fail(a, e)
            return
        self.steps += 1
        self.batched_rows += len(batch)
        for a in batch:
            a.steps += 1
        self._take(batch, logits if chunk is None else logits[:len(batch)])
        if chunk is not None:
            self.prefill_passes += 1
            a, write, _ = chunk
            self._prefilled(a, len(write.ids), len(a.slot.ids) - len(write.ids),
                            write.logits, logits[len(batch):])

    def _chunk_to_mix(self) -> tuple[_Active, Write, bool] | None:
        """The prompt chunk a decode pass carries (see the module's docstring): the first
        prefilling generation's next chunk of at most prefill_chunk tokens, with the logits
        after its last token when it ends the prompt; None when nothing can share the pass.
        Returns (request, write, whether it samples next)."""
        for a in self._prefilling:
            if a.reply is None:  # a scoring request wants logits all along: a pass of its own
                return None
            n = min(len(a.pending), self.prefill_chunk)
            if n < 2:  # a one-token row would look like a decode row: the prefill pass takes it
                return None
            final = n == len(a.pending)
            return a, Write(a.slot, a.pending[:n], (n - 1, n) if final else (0, 0)), final
        return None

    def _verify(self, batch: list[_Active]) -> bool:
        """A speculative decode pass: each row writes its last token and the tokens drafted
        after it, and keeps what the target agrees with (speculative.accept). Runs only when
        every generating row speculates (a plain row never waits for others' drafts); returns
        False, having run nothing, when no row has a draft this step."""
        spec = self.speculator
        assert spec is not None
        wanting, rows = [], []
        for a in batch:
            assert a.spec is not None
            if spec.wants(a.spec):
                # The verification row must fit in the context, and keep at most what the
                # request may still sample.
                limit = min(a.budget - 1, self.runner.max_seq_len - len(a.slot.ids) - 1)
                wanting.append(a)
                rows.append((a.spec, a.slot.ids + [a.token], limit, a.ticket.request.sampling,
                             a.generator))
        if not wanting:
            return False
        try:
            proposed = spec.propose(rows)
        except Exception:  # a failing draft model costs the speed-up, not the request
            log.exception("drafting failed; this step decodes without drafts")
            return False
        drafts = {id(a): d for a, d in zip(wanting, proposed)}
        if not any(d.ids for d in proposed):
            return False
        plan = []
        for a in batch:
            d = drafts.get(id(a), Draft([]))
            # A row with nothing drafted (paused, no match) is given its own token as a draft:
            # any proposal keeps the output exact, and every row then carries two tokens or
            # more, which the compiled verification graphs need (it is not counted).
            counted = bool(d.ids)
            if not counted and len(a.slot.ids) + 2 <= self.runner.max_seq_len and a.budget > 1:
                d = Draft([a.token])
            plan.append((a, d, counted))
        writes = [Write(a.slot, [a.token, *d.ids], (0, len(d.ids) + 1)) for a, d, _ in plan]
        bases = [len(a.slot.ids) for a in batch]
        try:
            logits = self.runner.run(writes, compiled=self.use_compiled)
        except Exception as e:
            log.exception("verification pass failed")
            for a in batch:
                self.cache.truncate(a.slot, 0)
                self._fail(a, e)
            return True
        self.steps += 1
        self.batched_rows += len(batch)
        spec.verify_passes += 1
        offset = 0
        for (a, d, counted), base in zip(plan, bases):
            part = logits[offset:offset + len(d.ids) + 1]
            offset += len(d.ids) + 1
            n, token = accept(part, d, a.ticket.request.sampling, a.generator)
            self.cache.truncate(a.slot, base + 1 + n)  # the rejected drafts' positions go
            assert a.spec is not None
            if counted:
                spec.update(a.spec, len(d.ids), n)
            a.steps += 1
            for i, t in enumerate([*d.ids[:n], token]):
                if self._emit(a, t, base + 1 + i):
                    break
        return True

    def _prefill(self) -> None:
        budget = self.prefill_chunk if self._decoding else max(self.prefill_chunk,
                                                                SOLO_PREFILL_CHUNK)
        parts: list[tuple[_Active, int, int, tuple[int, int]]] = []
        writes = []
        size = budget  # every request's chunks are whole chunks of this size, never the
        # remainder another request left in the pass: a prompt's chunk boundaries (which can
        # change the last bits of its logits) do not depend on who else is prefilling
        for a in self._prefilling:
            n = min(len(a.pending), size)
            if n > budget:  # the rest of the pass is too small for its chunk: the next pass
                break
            start = len(a.slot.ids)
            final = n == len(a.pending)
            req = a.ticket.request
            if req.score_from is not None:  # logits at p predict the token at p + 1
                lo = max(req.score_from - 1 - start, 0)
                hi = min(len(req.prompt) - 1 - start, n)
                rng = (lo, hi) if hi > lo else (0, 0)
            else:
                rng = (n - 1, n) if final else (0, 0)
            writes.append(Write(a.slot, a.pending[:n], rng))
            parts.append((a, n, start, rng))
            budget -= n
        _prepare([a for a, n, *_ in parts if n == len(a.pending)])  # those that sample next
        try:
            logits = self.runner.run(writes)
        except Exception as e:
            log.exception("prefill failed")
            for a, *_ in parts:
                self.cache.truncate(a.slot, 0)
                self._fail(a, e)
            return
        self.prefill_passes += 1
        offset = 0
        for a, n, start, (lo, hi) in parts:
            self._prefilled(a, n, start, (lo, hi), logits[offset:offset + hi - lo])
            offset += hi - lo

    def _prefilled(self, a: _Active, n: int, start: int, wanted: tuple[int, int],
                   rows: torch.Tensor) -> None:
        """Book a prompt chunk of n tokens written from `start`, with the logits `rows` of its
        tokens wanted[0]..wanted[1]-1: score them, or sample the first token after the prompt."""
        lo, hi = wanted
        del a.pending[:n]
        req = a.ticket.request
        if req.score_from is not None:
            if hi > lo:
                targets = torch.tensor(req.prompt[start + lo + 1:start + hi + 1],
                                       dtype=torch.long, device=rows.device)
                a.nll += _nll(rows, targets)
                a.scored += hi - lo
            if not a.pending:
                self._prefilling.remove(a)
                self._release(a)
                self._send(a.ticket, [Scored(a.nll, a.scored)])
        elif not a.pending:
            self._prefilling.remove(a)
            self._decoding.append(a)
            self._take([a], rows)

    def _take(self, batch: list[_Active], logits: torch.Tensor) -> None:
        """Sample a token for each request from its row of logits (B, vocab) and hand it on."""
        picked: Sequence[torch.Tensor] = ()
        if all(a.ticket.request.sampling.is_greedy and not a.processors for a in batch):
            # one argmax over the rows (each row's index is its own): a SmolLM2 decode token
            # spent about 20 us in the row's selection and the stack around it
            ids = greedy(logits).tolist()
        else:
            picked = [sample(_process(logits[i], a.processors), a.ticket.request.sampling,
                             a.generator) for i, a in enumerate(batch)]
            ids = torch.stack(picked).tolist()  # one read-back for the whole batch
        for i, (a, token_id) in enumerate(zip(batch, ids)):
            assert a.reply is not None
            k = a.ticket.request.top_logprobs
            logprob, top = None, ()
            if k is not None:
                lp = torch.log_softmax(logits[i], dim=-1)
                logprob = float(lp[token_id])
                if k > 0:
                    values, index = torch.topk(lp, k)
                    top = tuple(zip(index.tolist(), values.tolist()))
            for p in a.processors:
                p.push(picked[i])
            self._emit(a, token_id, len(a.slot.ids), logprob, top)

    def _emit(self, a: _Active, token_id: int, pos: int, logprob: float | None = None,
              top: tuple[tuple[int, float], ...] = ()) -> bool:
        """Hand a request its next token (to be written at `pos` by its next pass); return
        whether that ended it."""
        assert a.reply is not None
        now = time.perf_counter()
        if a.reply.sampled == 0:
            a.first = now
        a.last = now
        a.token = token_id
        a.budget -= 1
        chunk = a.reply.push(token_id, logprob)
        if chunk is not None:
            self._send(a.ticket, [Token(chunk, pos, top)])
        if a.reply.finish_reason is not None or a.budget <= 0:
            self._finish(a, "context")  # unless the reply has ended already
            return True
        return False

    # -- ending requests -------------------------------------------------------------------

    def _release(self, a: _Active) -> None:
        self.cache.release(a.slot, a.ticket)
        if a.spec is not None and self.speculator is not None:
            self.speculator.release(a.spec, a.ticket)

    def _remove(self, a: _Active) -> None:
        if a in self._decoding:
            self._decoding.remove(a)
        elif a in self._prefilling:
            self._prefilling.remove(a)
        self._release(a)

    def _finish(self, a: _Active, reason: str) -> None:
        self._remove(a)
        if a.reply is None:  # a scoring request cancelled
            self._send(a.ticket, [Failed("cancelled")])
            return
        tail = a.reply.end(reason)
        events: list[Event] = [TextChunk(tail, None)] if tail else []
        events.append(self._result(a.ticket, a.reply.finish_reason or reason, a))
        self._send(a.ticket, events)

    def _fail(self, a: _Active, e: Exception) -> None:
        self._remove(a)
        self._send(a.ticket, [Failed(_message(e), e)])

    @staticmethod
    def _result(ticket: Ticket, reason: str, a: _Active | None = None) -> GenerationResult:
        """The one place a GenerationResult is made (a: the request as it ran; None for one
        that never started)."""
        if a is None or a.reply is None:
            return GenerationResult(
                text="", finish_reason=reason, prompt_tokens=len(ticket.request.prompt),
                reused_tokens=0, completion_tokens=0, token_ids=(), prefill_s=0.0, decode_s=0.0)
        sampled = a.reply.sampled
        return GenerationResult(
            text=a.reply.text, finish_reason=reason, prompt_tokens=len(ticket.request.prompt),
            reused_tokens=a.reused, completion_tokens=sampled, token_ids=tuple(a.reply.ids),
            prefill_s=(a.first - a.start) if sampled else time.perf_counter() - a.start,
            decode_s=(a.last - a.first) if sampled else 0.0, decode_steps=a.steps,
            drafted_tokens=a.spec.drafted if a.spec else 0,
            accepted_tokens=a.spec.accepted if a.spec else 0)

    def _send(self, ticket: Ticket, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, FINAL):
                ticket.done = True
            if ticket.on_event is not None:
                ticket.on_event(e)
            else:
                with self._cond:
                    ticket.events.append(e)
                    self._cond.notify_all()


def _processors(req: Request, prompt: Sequence[int], device: torch.device) -> list[LogitsProcessor]:
    """A generating request's logits processors: its penalties, then its constraint's mask
    (last: a penalty must not turn a masked -inf back into a finite logit)."""
    out = logits_processors(req.sampling, prompt, device)
    return out + ([req.constraint.processor(device)] if req.constraint is not None else [])


def _prepare(batch: Sequence[_Active]) -> None:
    """Let the rows' processors start on their next token's work (a grammar's mask) while the
    forward pass runs."""
    for a in batch:
        for p in a.processors:
            prepare = getattr(p, "prepare", None)
            if prepare is not None:
                prepare()


def _process(logits: torch.Tensor, processors: Sequence[LogitsProcessor]) -> torch.Tensor:
    for p in processors:
        logits = p(logits)
    return logits


_NLL_ROWS = 256  # rows turned into log-probabilities at once (bounds the float32 temporaries)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy (nats) of targets under logits (n, vocab), added up on the host in
    float64 one float32 sum per chunk of rows."""
    total = 0.0
    for i in range(0, len(targets), _NLL_ROWS):
        total += float(F.cross_entropy(logits[i:i + _NLL_ROWS], targets[i:i + _NLL_ROWS],
                                       reduction="sum"))
    return total


def _message(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if isinstance(e, LlamarunError) else f"internal error: {text}"
