"""What a generation streams and how it ends: TextChunk, Token, GenerationResult, the other
events of a request, and Generation (a synchronous client of the scheduler)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llamarun.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class TextChunk:
    """A piece of streamed output: one token and the text it made final (possibly "")."""

    text: str
    token_id: int | None  # None for text not tied to a new token (echoed prompt, final flush)
    logprob: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    """How a generation ended, with its token counts and timings."""

    text: str
    finish_reason: str  # "stop" (stop id or stop string), "length", "context" or "cancelled"
    prompt_tokens: int  # the whole prompt
    reused_tokens: int  # of which were already in the KV cache (a shared prefix): not prefilled
    completion_tokens: int  # tokens sampled, a final stop token included
    token_ids: tuple[int, ...]  # the completion's ids, without a final stop token
    prefill_s: float  # start until the first token id was on the host (time to first token)
    decode_s: float  # first token until the last one
    decode_steps: int = 0  # the target's decode (or verification) passes after the first token
    drafted_tokens: int = 0  # speculative decoding: tokens drafted for it ...
    accepted_tokens: int = 0  # ... and kept by the target

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed for this request."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tok_s(self) -> float:
        """Prefilled tokens per second (including the first sample)."""
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def acceptance(self) -> float | None:
        """The share of drafted tokens the target kept (None: nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens after the first one per decode pass of the target (1.0 without drafts)."""
        steps = self.completion_tokens - 1
        return steps / self.decode_steps if self.decode_steps and steps > 0 else None

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (each costs one decode step)."""
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class Reply:
    """Turns a reply's sampled ids into text chunks and tells when it ends (stop id, stop string
    or max_new_tokens)."""

    def __init__(self, tokenizer: Tokenizer, *, stop: Sequence[str] = (),
                 max_new_tokens: int, stop_ids: bool = True, text: bool = True) -> None:
        # text=False: ids only (benchmarks, tools): no detokenizing, chunks carry no text.
        self._text = StreamDecoder(tokenizer, stop_strings=stop) if text else None
        self._stop_ids = tokenizer.stop_ids if stop_ids else frozenset()
        self.max_new_tokens = max_new_tokens
        self.ids: list[int] = []  # the reply's ids, without a final stop id
        self.sampled = 0  # ids pushed, a final stop id included
        self.finish_reason: str | None = None  # set once the reply has ended

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return self._text.text if self._text is not None else ""

    def push(self, token_id: int, logprob: float | None = None) -> TextChunk | None:
        """Add a sampled id; return its chunk (None for a stop id, which ends the reply)."""
        self.sampled += 1
        if token_id in self._stop_ids:
            self.finish_reason = "stop"
            return None
        self.ids.append(token_id)
        text = self._text.push(token_id) if self._text is not None else ""
        chunk = TextChunk(text, token_id, logprob)
        if self._text is not None and self._text.stopped:
            self.finish_reason = "stop"
        elif self.sampled >= self.max_new_tokens:
            self.finish_reason = "length"
        return chunk

    def end(self, reason: str) -> str:
        """End the reply (unless it has ended already) for `reason`; return the text held back
        (a partial stop string or UTF-8 sequence that turned out not to be one), if it is to be
        shown."""
        if self.finish_reason is None:
            self.finish_reason = reason
        if self._text is None or self._text.stopped or self.finish_reason == "cancelled":
            return ""
        return self._text.flush()


@dataclass(frozen=True)
class Token:
    """One streamed token: its chunk of text (with its id and log-probability), its position in
    the KV cache, and the top alternatives when asked for."""

    chunk: TextChunk
    pos: int = 0
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Scored:
    """A scoring request's result: summed negative log-likelihood (nats) of `tokens` tokens."""

    nll: float
    tokens: int


@dataclass(frozen=True)
class Failed:
    """A request that ended in an error: `message` for a client, `error` when there is one."""

    message: str
    error: Exception | None = None


# What a request receives, in order: Token/TextChunk..., then a GenerationResult, Scored or Failed.
Event = Token | TextChunk | GenerationResult | Scored | Failed
FINAL = (GenerationResult, Scored, Failed)


class Generation:
    """A synchronous client of the scheduler: an iterator of TextChunk for one request; `result`
    is set once it is exhausted or closed.

    Nothing is submitted until the first chunk is asked for; `echo` text, if any, comes first.
    `submit()` returns the request's ticket and `next_event(ticket)` its next event (driving the
    scheduler's loop in this thread when no other thread does).
    """

    def __init__(self, submit: Callable[[], Any], next_event: Callable[[Any], Event], *,
                 prompt_tokens: int, echo: str = "",
                 on_done: Callable[[GenerationResult], None] | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.dropped_turns = 0  # set by ChatSession when old turns were dropped to fit
        self._submit = submit
        self._next_event = next_event
        self._ticket: Any = None
        self._echo = echo
        self._result: GenerationResult | None = None
        self._on_done = on_done

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> TextChunk:
        if self._result is not None:
            raise StopIteration
        if self._echo:
            echo, self._echo = self._echo, ""
            return TextChunk(echo, None)
        if self._ticket is None:
            self._ticket = self._submit()
        while True:
            event = self._next_event(self._ticket)
            if isinstance(event, Token):
                return event.chunk
            if isinstance(event, TextChunk):
                return event
            if isinstance(event, GenerationResult):
                self._finish(event)
                raise StopIteration
            if isinstance(event, Failed):
                self._finish(self._empty("cancelled"))
                if event.error is not None:
                    raise event.error
                raise RuntimeError(event.message)

    def close(self) -> None:
        """Stop generating; `result` then reports finish_reason "cancelled"."""
        if self._result is not None:
            return
        if self._ticket is None:  # never started: nothing was computed
            self._finish(self._empty("cancelled"))
            return
        self._ticket.cancel()
        while True:
            event = self._next_event(self._ticket)
            if isinstance(event, GenerationResult):
                self._finish(event)
                return
            if isinstance(event, Failed):
                self._finish(self._empty("cancelled"))
                return

    def __del__(self) -> None:  # an abandoned generation frees its slot
        ticket = getattr(self, "_ticket", None)
        if ticket is not None and getattr(self, "_result", None) is None:
            ticket.cancel()

    @property
    def done(self) -> bool:
        """Whether the generation has ended."""
        return self._result is not None

    @property
    def result(self) -> GenerationResult:
        """The final result (raises if the generation is still running)."""
        if self._result is None:
            raise RuntimeError("the generation has not finished: iterate it to the end or close() it")
        return self._result

    def _empty(self, reason: str) -> GenerationResult:
        return GenerationResult(text="", finish_reason=reason, prompt_tokens=self.prompt_tokens,
                                reused_tokens=0, completion_tokens=0, token_ids=(),
                                prefill_s=0.0, decode_s=0.0)

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        if self._on_done is not None:
            self._on_done(result)
