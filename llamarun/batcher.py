"""Continuous batching: many requests decoded together, one token each per forward pass.

A Batcher owns a thread that loops: admit waiting requests into free KV cache slots (prefilling
what each slot lacks of the prompt), then run one batched decode step for every active request,
sample each row with its own settings, and hand each token to its request. Finished or cancelled
requests leave at once, freeing their slot for the next. Greedy output does not depend on the
batch (see Transformer.decode).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llamarun.decoder import Decoder
from llamarun.errors import LlamarunError
from llamarun.generate import process
from llamarun.generation import GenerationResult, Reply, TextChunk
from llamarun.sampling import LogitsProcessor, SamplingParams, generator_for, logits_processors, sample
from llamarun.slots import Slot, SlotPool
from llamarun.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFull(LlamarunError):
    """The batcher's queue of waiting requests is full."""


class Stopped(LlamarunError):
    """The batcher is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Request:
    """What to generate: prompt ids, sampling and limits (max_new_tokens >= 1)."""

    prompt: Sequence[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no log-probabilities; k: the token's and the top k


@dataclass(frozen=True)
class Token:
    """One streamed token: its chunk of text, its log-probability and the top alternatives."""

    chunk: TextChunk
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Failed:
    """A request that ended in an error (message for the client)."""

    message: str


# What a ticket receives, in order: Token..., then one GenerationResult (or Failed).
Event = Token | TextChunk | GenerationResult | Failed


class Ticket:
    """A submitted request. Its events go to `on_event`, called from the batcher's thread."""

    def __init__(self, request: Request, on_event: Callable[[Event], None]) -> None:
        self.request = request
        self.on_event = on_event
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request (a client went away); its slot is freed at once."""
        self.cancelled.set()


@dataclass
class _Active:
    ticket: Ticket
    slot: Slot
    reply: Reply
    generator: torch.Generator | None
    processors: list[LogitsProcessor]
    budget: int  # tokens this request may still sample (context and max_new_tokens)
    reused: int
    start: float
    token: int = -1  # the last sampled id (written by the next step)
    first: float = 0.0
    last: float = 0.0
    events: list[Event] = field(default_factory=list)


class Batcher:
    """Decodes the requests submitted to it in batches, in a thread of its own."""

    def __init__(self, decoder: Decoder, slots: SlotPool, tokenizer: Tokenizer, *,
                 max_queue: int = 64) -> None:
        self.decoder = decoder
        self.slots = slots
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self._waiting: deque[Ticket] = deque()
        self._active: list[_Active] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llamarun-batcher", daemon=True)
        self.steps = 0  # batched decode steps run (for statistics)
        self.batched_rows = 0  # rows in them

    def start(self) -> None:
        """Start the decoding thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is waiting or running and end the thread."""
        with self._wake:
            self._stopping = True
            for t in self._waiting:
                t.cancel()
            for a in self._active:
                a.ticket.cancel()
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def busy(self) -> tuple[int, int]:
        """(requests decoding, requests waiting)."""
        return len(self._active), len(self._waiting)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Ticket:
        """Queue a request; raise QueueFull when too many wait, Stopped when shutting down."""
        ticket = Ticket(request, on_event)
        with self._wake:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already; retry later")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    # -- the decoding thread ---------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._waiting or self._active or self._stopping):
                        self._wake.wait()
                    if self._stopping and not self._active and not self._waiting:
                        return
                self._leave_cancelled()
                self._admit()
                if self._active:
                    self._step()

    def _admit(self) -> None:
        """Prefill waiting requests into free slots; each samples its first token."""
        while True:
            with self._wake:
                if not self._waiting or self.slots.free == 0:
                    return
                ticket = self._waiting.popleft()
            if ticket.cancelled.is_set():
                self._send(ticket, [self._empty_result(ticket, "cancelled")])
                continue
            slot = self.slots.acquire(ticket.request.prompt, ticket)
            assert slot is not None
            try:
                self._start(ticket, slot)
            except Exception as e:  # one bad request must not stop the others
                log.exception("prefill failed")
                self.slots.release(slot, ticket)
                slot.clear()  # what the failed prefill left is unknown
                self._send(ticket, [Failed(_message(e))])

    def _start(self, ticket: Ticket, slot: Slot) -> None:
        req = ticket.request
        start = time.perf_counter()
        reused = slot.keep_prefix(req.prompt)
        prompt = list(req.prompt)
        a = _Active(
            ticket=ticket, slot=slot,
            reply=Reply(self.tokenizer, stop=req.stop, max_new_tokens=req.max_new_tokens),
            generator=generator_for(req.sampling, self.decoder.device),
            processors=logits_processors(req.sampling, prompt, self.decoder.device),
            budget=min(req.max_new_tokens, self.decoder.max_seq_len - len(prompt)),
            reused=reused, start=start)
        logits = self.decoder.prefill(slot, prompt[reused:])
        self._active.append(a)
        self._take([a], logits[None])

    def _step(self) -> None:
        """One decode step for every active request."""
        batch = list(self._active)
        tokens = [a.token for a in batch]
        try:
            logits = self.decoder.step([a.slot for a in batch],
                                       torch.tensor(tokens, device=self.decoder.device), tokens)
        except Exception as e:
            log.exception("decode step failed")
            for a in batch:
                a.slot.clear()
                self._finish(a, failed=_message(e))
            return
        self.steps += 1
        self.batched_rows += len(batch)
        self._take(batch, logits)

    def _take(self, batch: list[_Active], logits: torch.Tensor) -> None:
        """Sample a token for each request from its row of logits (B, vocab) and hand it on."""
        picked = [sample(process(logits[i], a.processors), a.ticket.request.sampling, a.generator)
                  for i, a in enumerate(batch)]
        ids = torch.stack(picked).tolist()  # one read-back for the whole batch
        now = time.perf_counter()
        for i, (a, token_id) in enumerate(zip(batch, ids)):
            k = a.ticket.request.top_logprobs
            logprob, top = None, ()
            if k is not None:
                lp = torch.log_softmax(logits[i], dim=-1)
                logprob = float(lp[token_id])
                if k > 0:
                    values, index = torch.topk(lp, k)
                    top = tuple(zip(index.tolist(), values.tolist()))
            if a.reply.sampled == 0:
                a.first = now
            a.last = now
            a.token = token_id
            a.budget -= 1
            chunk = a.reply.push(token_id, logprob)
            if chunk is not None:
                a.ticket.on_event(Token(chunk, top))
            for p in a.processors:
                p.push(picked[i])
            if a.reply.finish_reason is not None or a.budget <= 0:
                self._finish(a, reason="context")  # unless the reply has ended already

    def _leave_cancelled(self) -> None:
        for a in [a for a in self._active if a.ticket.cancelled.is_set()]:
            self._finish(a, reason="cancelled")

    def _finish(self, a: _Active, *, reason: str = "stop", failed: str | None = None) -> None:
        self._active.remove(a)
        self.slots.release(a.slot, a.ticket)
        if failed is not None:
            self._send(a.ticket, [Failed(failed)])
            return
        tail = a.reply.end(reason)
        events: list[Event] = [TextChunk(tail, None)] if tail else []
        events.append(GenerationResult(
            text=a.reply.text, finish_reason=a.reply.finish_reason or reason,
            prompt_tokens=len(a.ticket.request.prompt), reused_tokens=a.reused,
            completion_tokens=a.reply.sampled, token_ids=tuple(a.reply.ids),
            prefill_s=a.first - a.start, decode_s=a.last - a.first))
        self._send(a.ticket, events)

    def _empty_result(self, ticket: Ticket, reason: str) -> GenerationResult:
        return GenerationResult(text="", finish_reason=reason,
                                prompt_tokens=len(ticket.request.prompt), reused_tokens=0,
                                completion_tokens=0, token_ids=(), prefill_s=0.0, decode_s=0.0)

    @staticmethod
    def _send(ticket: Ticket, events: list[Event]) -> None:
        for e in events:
            ticket.on_event(e)


def _message(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if isinstance(e, LlamarunError) else f"internal error: {text}"
