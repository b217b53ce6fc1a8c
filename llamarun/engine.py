"""Engine: a loaded model with its tokenizer, chat format, KV cache manager and scheduler.

Every generation is a request to the engine's scheduler (llamarun.scheduler): `generate`,
`complete` and `ChatSession.send` return a Generation that submits its request when first
iterated and drives the scheduler's loop while it waits; the server runs the same loop in a
thread of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llamarun.cache_manager import CacheManager
from llamarun.errors import InvalidArgumentError, PromptTooLongError
from llamarun.generation import (
    FINAL, Event, Failed, Generation, GenerationResult, Scored, TextChunk, Token,
)
from llamarun.loaders import Checkpoint, TensorParallel, detect_layout, load_checkpoint
from llamarun.runner import Runner
from llamarun.sampling import Constraint, SamplingParams
from llamarun.scheduler import DEFAULT_PREFILL_CHUNK, Request, Scheduler, Ticket
from llamarun.session import ChatSession
from llamarun.speculative import (
    DEFAULT_DRAFT_TOKENS, DraftModel, SpecConfig, Speculator, check_vocab,
)
from llamarun.tokenizer import ChatFormat, Tokenizer, load_chat_format, load_tokenizer

__all__ = ["ChatSession", "Engine", "Generation", "GenerationResult", "TextChunk", "load"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, its position in the cache, and optionally its log-probability."""

    id: int
    pos: int  # where the token goes in the cache (it is written there by the next step)
    logprob: float | None = None


class Engine:
    """A model ready to generate: weights, KV cache manager, tokenizer, chat format, scheduler."""

    def __init__(self, checkpoint: Checkpoint, tokenizer: Tokenizer, chat_format: ChatFormat, *,
                 compile: bool = False, load_s: float = 0.0,
                 tp: TensorParallel | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.args = checkpoint.args
        self.device = checkpoint.device
        self.dtype = checkpoint.dtype
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.compiled = compile
        self.load_s = load_s
        self.cache = CacheManager(self.model.max_batch_size, self.model.max_seq_len)
        self.runner = Runner(self.model, self.cache, compile=compile)
        self.scheduler = Scheduler(self.runner, self.cache, tokenizer, prefill_chunk=prefill_chunk)
        self.tp = tp  # this rank's collectives in a tensor-parallel job, else None
        self.draft: Engine | None = None  # the draft model, when speculating with one

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", max_seq_len: int | None = None,
             compile: bool = False, chat_template: str | None = None, quantize: str = "auto",
             group_size: int = 32, slots: int = 1,
             progress: Callable[[int, int], None] | None = None,
             tp: TensorParallel | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Engine:
        """Load a Meta/HF folder or GGUF file, its tokenizer and its chat format.

        quantize and group_size are as in loaders.load_checkpoint; `slots` sequences can be
        cached at once (max_seq_len positions each); progress(done, total) is called while the
        weights are converted; with `tp` (llamarun.parallel.Collectives) this process holds its
        rank's part of the model, and every rank must run the same generations in step;
        prefill_chunk is the scheduler's prompt-token budget per step while others generate.
        """
        if max_seq_len is not None and max_seq_len < 2:
            raise InvalidArgumentError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if slots < 1:
            raise InvalidArgumentError(f"slots must be at least 1, got {slots}")
        if prefill_chunk < 1:
            raise InvalidArgumentError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        start = time.perf_counter()
        _, source = detect_layout(Path(path))
        # The tokenizer first: its build-time temporaries are gone before the weights arrive
        # (a lower peak), and a broken tokenizer fails before gigabytes are read.
        tokenizer = load_tokenizer(source)
        ckpt = load_checkpoint(source, device=device, dtype=dtype, max_seq_len=max_seq_len,
                               max_batch_size=slots, quantize=quantize, group_size=group_size,
                               progress=progress, tp=tp)
        folder = source if source.is_dir() else None
        chat_format = load_chat_format(tokenizer, folder, chat_template=chat_template)
        return cls(ckpt, tokenizer, chat_format, compile=compile,
                   load_s=time.perf_counter() - start, tp=tp, prefill_chunk=prefill_chunk)

    def speculate(self, config: SpecConfig, draft: Engine | None = None) -> None:
        """Decode speculatively from now on: with a draft model (another Engine with the same
        vocabulary, loaded on the same device) or, with config.lookup, by prompt lookup."""
        model = None
        if draft is not None:
            if self.tp is not None:
                raise InvalidArgumentError("a draft model cannot be used with --tp (prompt lookup "
                                           "can: --lookup N)")
            check_vocab(self.args.vocab_size, draft.args.vocab_size)
            if draft.device != self.device:
                raise InvalidArgumentError(f"the draft model is on {draft.device} but the model "
                                           f"on {self.device}")
            if (draft.model.max_batch_size < self.model.max_batch_size
                    or draft.max_seq_len < self.max_seq_len):
                draft.model.setup_caches(self.model.max_batch_size, self.max_seq_len)
                draft.cache = CacheManager(self.model.max_batch_size, self.max_seq_len)
                draft.runner = Runner(draft.model, draft.cache, compile=draft.compiled)
                draft.scheduler = Scheduler(draft.runner, draft.cache, draft.tokenizer)
            model = DraftModel(draft.runner, draft.cache)
        self.scheduler.speculator = Speculator(config, model)
        self.draft = draft
        self.runner.enable_verify()  # compiled verification graphs, when compiling
        if draft is not None:
            draft.runner.mix = False  # it runs drafts only: no prompt chunks in decode passes
            draft.runner.enable_verify()  # its catch-up passes of a few tokens

    def load_draft(self, path: str | Path, *, config: SpecConfig = SpecConfig(),
                   quantize: str = "auto", group_size: int = 32) -> Engine:
        """Load a draft model for this one (same device, context and slots) and speculate with
        it; return it."""
        draft = Engine.load(path, device=self.device, max_seq_len=self.max_seq_len,
                            slots=self.model.max_batch_size, compile=self.compiled,
                            quantize=quantize, group_size=group_size)
        self.speculate(config, draft)
        return draft

    @property
    def speculator(self) -> Speculator | None:
        """How generations draft ahead (None: they do not)."""
        return self.scheduler.speculator

    @property
    def max_seq_len(self) -> int:
        """Length of the KV cache: the most tokens a prompt and its completion can hold."""
        return self.model.max_seq_len

    @property
    def slots(self) -> CacheManager:
        """The KV cache's rows and what each holds."""
        return self.cache

    def ensure_context(self, n: int) -> None:
        """Grow the KV cache to at least n positions per slot (forgetting what the slots hold)."""
        if n > self.max_seq_len:
            if self.scheduler.busy != (0, 0):
                raise RuntimeError("the KV cache cannot grow while requests run")
            self.model.setup_caches(self.model.max_batch_size, n)
            self.cache.resize(n)
            if self.draft is not None:
                self.draft.ensure_context(n)

    # -- compiling (see Runner) ------------------------------------------------------------

    def compile_in_background(self) -> bool:
        """Start compiling the decode graphs in a thread (see Runner.compile_in_background);
        they take over between generations once ready."""
        if self.draft is not None:
            self.draft.compile_in_background()
        return self.runner.compile_in_background()

    def wait_compiled(self) -> None:
        """Block until the compiled graphs are ready (compiling them here if nobody started);
        the next generation uses them."""
        if self.draft is not None:
            self.draft.wait_compiled()
        self.runner.wait_compiled()

    @property
    def compiles_in_background(self) -> bool:
        """Whether compile_in_background() can work here."""
        return self.runner.compiles_in_background

    @property
    def compile_pays(self) -> bool:
        """Whether a compiled decode step can be expected to beat the eager one: not where an
        eager decode pass is one call of llamarun's fused CPU kernels, embedding to logits
        (model.Transformer.fuses_decode), which measured 1.4-1.5x the compiled step's tok/s
        (SmolLM2 Q4_0 and Q8_0, AMD EPYC; inductor's code between the same product kernels)."""
        return not self.model.fuses_decode()

    @property
    def compiling(self) -> bool:
        """Whether a background compile is still running."""
        return self.runner.compiling

    @property
    def compiled_ready(self) -> bool:
        """Whether the compiled decode graphs are built (they are used from the next
        generation that starts with nothing else running)."""
        return self.runner.compiled_ready

    @property
    def compiled_in_use(self) -> bool:
        """Whether decode steps run the compiled graphs now."""
        return self.scheduler.use_compiled

    @property
    def compile_state(self) -> str:
        """In words: "in use", "ready" (from the next generation started while none runs),
        "compiling", "failed" or "off"."""
        if self.compiled_in_use:
            return "in use"
        if self.compiled_ready:
            return "ready"
        if self.compiling:
            return "compiling"
        if self.compile_error is not None:
            return "failed"
        return "off"

    @property
    def compile_error(self) -> Exception | None:
        """Why a background compile failed (None if it did not)."""
        return self.runner.compile_error

    def warmup(self, *, steps: int = 2) -> float:
        """Compile the decode graphs (when compile=True) and run a few steps; return the seconds."""
        start = time.perf_counter()
        self.wait_compiled()
        prompt = [self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0]
        for _ in self.token_events(prompt, max_new_tokens=steps + 1, reuse=False):
            pass
        return time.perf_counter() - start

    # -- generating ------------------------------------------------------------------------

    def encode_prompt(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of a raw completion prompt (BOS when the tokenizer's settings say so).

        Special-token text in `text` stays text unless `special` (then a leading BOS text counts as the BOS).
        """
        tok = self.tokenizer
        if not special:
            return tok.encode(text, bos=tok.add_bos)
        ids = tok.encode_with_special(text)
        if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids.insert(0, tok.bos_id)
        return ids

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raise InvalidArgumentError unless every id is one of the model's tokens."""
        vocab = self.args.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidArgumentError(f"token id {bad} is not in the model's vocabulary "
                                       f"(ids 0 to {vocab - 1})")

    def check_fits(self, n_tokens: int) -> None:
        """Raise PromptTooLongError unless a prompt of n_tokens leaves room to generate."""
        if n_tokens >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {n_tokens} tokens but the context holds {self.max_seq_len}; "
                f"shorten it or raise --max-seq-len")

    def complete(self, prompt: str | Sequence[int], *, sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), echo: bool = False,
                 logprobs: bool = False, special: bool = False,
                 constraint: Constraint | None = None) -> Generation:
        """Stream a raw continuation of `prompt` (text, or token ids used as they are).

        `special` parses special-token text in a text prompt into control tokens (see encode_prompt);
        `constraint` is what the output must match (see generate).
        """
        ids = self.encode_prompt(prompt, special=special) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidArgumentError("the prompt is empty and the tokenizer adds no BOS token")
        return self.generate(ids, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop,
                             logprobs=logprobs, constraint=constraint,
                             echo=prompt if echo and isinstance(prompt, str) else "")

    def chat(self, *, system: str | None = None) -> ChatSession:
        """A new conversation that keeps its history in the KV cache."""
        return ChatSession(self, system=system)

    def generate(self, prompt_ids: Sequence[int], *, sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), logprobs: bool = False,
                 echo: str = "", constraint: Constraint | None = None,
                 on_done: Callable[[GenerationResult], None] | None = None) -> Generation:
        """Stream the continuation of prompt_ids as text.

        Nothing runs until the Generation is iterated; then its request goes to the scheduler,
        which gives it a free cache slot (the one holding the longest prefix of the prompt; it
        waits while every slot is busy), prefills only what the slot lacks, and decodes. A
        non-empty `echo` is yielded first, as a chunk with no token. on_done(result) is called
        when it ends. A `constraint` (llamarun.structured: a JSON schema, a grammar) masks the
        tokens the output may not take next.
        """
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = list(prompt_ids)
        if not ids:
            raise InvalidArgumentError("the prompt has no tokens")
        self.check_ids(ids)
        self.check_fits(len(ids))
        request = Request(ids, sampling or SamplingParams(), max_new_tokens, tuple(stop),
                          top_logprobs=0 if logprobs else None, constraint=constraint)
        return Generation(lambda: self.scheduler.submit(request), self.scheduler.next_event,
                          prompt_tokens=len(ids), echo=echo, on_done=on_done)

    def submit(self, request: Request) -> Ticket:
        """Submit a request to the scheduler (its events: `next_event(ticket)`)."""
        return self.scheduler.submit(request)

    def token_events(self, prompt_ids: Sequence[int], *, max_new_tokens: int,
                     sampling: SamplingParams | None = None, reuse: bool = True) -> Iterator[TokenEvent]:
        """The raw token loop (ids, no text; stop ids do not end it): for benchmarks and tools.
        reuse=False prefills the whole prompt even where a slot holds it already."""
        self.check_ids(prompt_ids)
        request = Request(list(prompt_ids), sampling or SamplingParams.greedy(), max_new_tokens,
                          reuse=reuse, stop_ids=False, text=False)
        ticket = self.scheduler.submit(request)
        try:
            for event in self._events(ticket):
                if isinstance(event, Token):
                    assert event.chunk.token_id is not None
                    yield TokenEvent(event.chunk.token_id, event.pos, event.chunk.logprob)
        finally:
            if not ticket.done:
                ticket.cancel()
                while not isinstance(self.scheduler.next_event(ticket), FINAL):
                    pass

    def score(self, ids: Sequence[int], *, first: int) -> Scored:
        """Summed negative log-likelihood of ids[first:], each token given those before it
        (the window starts at position 0 of a slot; perplexity runs on this)."""
        self.check_ids(ids)
        ticket = self.scheduler.submit(Request(list(ids), score_from=first))
        for event in self._events(ticket):
            if isinstance(event, Scored):
                return event
        raise RuntimeError("a scoring request ended without a score")

    def _events(self, ticket: Ticket) -> Iterator[Event]:
        """A ticket's events up to its final one, driving the scheduler as needed; a Failed
        event raises its error."""
        while True:
            event = self.scheduler.next_event(ticket)
            if isinstance(event, Failed):
                raise event.error or RuntimeError(event.message)
            yield event
            if isinstance(event, (GenerationResult, Scored)):
                return


def load(path: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         max_seq_len: int | None = None, compile: bool = False, quantize: str = "auto",
         group_size: int = 32, slots: int = 1, draft_model: str | Path | None = None,
         lookup: int | None = None, draft_tokens: int | None = None) -> Engine:
    """Load a model for generation (see Engine.load); with `draft_model` (a path) or `lookup`
    (n-gram size) it decodes speculatively, drafting up to `draft_tokens` tokens a step."""
    if draft_model is not None and lookup is not None:
        raise InvalidArgumentError("give a draft model or lookup, not both")
    # (checked before the weights load)
    config = SpecConfig(draft_tokens=draft_tokens or DEFAULT_DRAFT_TOKENS, lookup=lookup)
    engine = Engine.load(path, device=device, dtype=dtype, max_seq_len=max_seq_len,
                         compile=compile, quantize=quantize, group_size=group_size, slots=slots)
    if draft_model is not None:
        engine.load_draft(draft_model, config=config)
    elif lookup is not None:
        engine.speculate(config)
    return engine
