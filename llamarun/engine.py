"""Engine: a loaded model with its tokenizer and chat format; text completion and chat sessions.

The engine owns torch.compile (opt-in) and turns token ids into streamed text. A `Generation`
yields `TextChunk`s and, once exhausted or closed, holds a `GenerationResult`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llamarun.device import compile_options, is_async, synchronize, uses_cuda_graphs
from llamarun.errors import InvalidArgumentError, PromptTooLongError
from llamarun.generate import DecodeStep, decode_one_token, eager_step, generate_tokens, kv_bucket
from llamarun.loaders import Checkpoint, detect_layout, load_checkpoint
from llamarun.sampling import SamplingParams, make_generator
from llamarun.tokenizer import ChatFormat, StreamDecoder, Tokenizer, load_chat_format, load_tokenizer

if TYPE_CHECKING:
    from llamarun.session import ChatSession

log = logging.getLogger(__name__)


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
    prompt_tokens: int  # tokens prefilled for this request
    completion_tokens: int  # tokens sampled, a final stop token included
    token_ids: tuple[int, ...]  # the completion's ids, without a final stop token
    cached_tokens: int  # how many of token_ids are already written to the KV cache
    prefill_s: float  # start until the first token id was on the host (time to first token)
    decode_s: float  # first token until the last one

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second (prefill, including the first sample)."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (each costs one decode step)."""
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class Generation:
    """An iterator of TextChunk; `result` is set once it is exhausted or closed."""

    def __init__(self, chunks: Callable[[Generation], Iterator[TextChunk]], *,
                 prompt_tokens: int, on_done: Callable[[GenerationResult], None] | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.dropped_turns = 0  # set by ChatSession when old turns were dropped to fit
        self._result: GenerationResult | None = None
        self._on_done = on_done
        self._it = chunks(self)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> TextChunk:
        return next(self._it)

    def close(self) -> None:
        """Stop generating; `result` then reports finish_reason "cancelled"."""
        self._it.close()

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

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        if self._on_done is not None:
            self._on_done(result)


class Engine:
    """A model ready to generate: weights, KV cache, tokenizer, chat format and decode step."""

    def __init__(self, checkpoint: Checkpoint, tokenizer: Tokenizer, chat_format: ChatFormat, *,
                 compile: bool = False, load_s: float = 0.0) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.args = checkpoint.args
        self.device = checkpoint.device
        self.dtype = checkpoint.dtype
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.compiled = compile
        self.load_s = load_s
        # An asynchronous device computes the next step while the host streams the current token.
        self.lookahead = is_async(self.device)
        # Bumped whenever a new generation writes the KV cache, so a ChatSession can tell that
        # someone else overwrote the conversation it left there.
        self.cache_version = 0
        self._compiled_ready = False
        self._compile_thread: threading.Thread | None = None
        self._build_compiled: Callable[[], None] = lambda: None
        self.compile_error: Exception | None = None
        self.decode_step: DecodeStep = self._compiled_step() if compile else eager_step(self.model)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", max_seq_len: int | None = None,
             compile: bool = False, chat_template: str | None = None, quantize: str = "auto",
             group_size: int = 32,
             progress: Callable[[int, int], None] | None = None) -> Engine:
        """Load a Meta/HF folder or GGUF file, its tokenizer and its chat format.

        quantize and group_size are as in loaders.load_checkpoint; progress(done, total) is
        called while the weights are converted.
        """
        if max_seq_len is not None and max_seq_len < 2:
            raise InvalidArgumentError(f"max_seq_len must be at least 2, got {max_seq_len}")
        start = time.perf_counter()
        _, source = detect_layout(Path(path))
        # The tokenizer first: its build-time temporaries are gone before the weights arrive
        # (a lower peak), and a broken tokenizer fails before gigabytes are read.
        tokenizer = load_tokenizer(source)
        ckpt = load_checkpoint(source, device=device, dtype=dtype, max_seq_len=max_seq_len,
                               quantize=quantize, group_size=group_size, progress=progress)
        folder = source if source.is_dir() else None
        chat_format = load_chat_format(tokenizer, folder, chat_template=chat_template)
        return cls(ckpt, tokenizer, chat_format, compile=compile,
                   load_s=time.perf_counter() - start)

    @property
    def max_seq_len(self) -> int:
        """Length of the KV cache: the most tokens a prompt and its completion can hold."""
        return self.model.max_seq_len

    def _compiled_step(self) -> DecodeStep:
        cuda_graphs = uses_cuda_graphs(self.device)
        set_compile_cache()
        # dynamic=True: one graph serves every attention length. Without CUDA graphs each step
        # attends over exactly the used part of the cache; CUDA graphs record one graph per
        # shape, so there the length is rounded up to a KV_BUCKET and masked.
        # The model's modules never change after loading: checking them before every step (about
        # 1 ms a token for a 30-layer model on CPU) buys nothing.
        options = compile_options(self.device)
        skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip_module_guards is not None:  # torch >= 2.7
            options["guard_filter_fn"] = skip_module_guards
        compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=True, options=options)
        model = self.model
        eager = eager_step(model)

        def run(token: torch.Tensor, input_pos: torch.Tensor, pos: int) -> torch.Tensor:
            if cuda_graphs:  # CUDA graphs reuse their output buffers: keep a copy
                return compiled(model, token, input_pos, kv_bucket(pos, model.max_seq_len)).clone()
            return compiled(model, token, input_pos, pos + 1, True)

        def step(token: torch.Tensor, input_pos: torch.Tensor, pos: int) -> torch.Tensor:
            return run(token, input_pos, pos) if self._compiled_ready else eager(token, input_pos, pos)

        def build() -> None:
            # One step on a scratch slot near the end of the cache: a real step compiles the
            # graph; the slot is overwritten before any query can attend to it.
            pos = model.max_seq_len - 2
            with torch.inference_mode():  # inputs made as generate_tokens makes them: no recompile
                token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
                input_pos = torch.tensor([pos], dtype=torch.long, device=self.device)
                run(token, input_pos, pos)
            synchronize(self.device)
            self._compiled_ready = True

        self._build_compiled = build
        return step

    def warmup(self, *, steps: int = 2) -> float:
        """Compile the decode step (when compile=True) and run a few steps; return the seconds."""
        self.claim_cache()
        start = time.perf_counter()
        self.wait_compiled()
        prompt = [self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0]
        events = generate_tokens(self.model, prompt, sampling=SamplingParams.greedy(), generator=None,
                                 max_new_tokens=steps + 1, step=self.decode_step)
        for _ in events:
            pass
        return time.perf_counter() - start

    def compile_in_background(self) -> bool:
        """Start compiling the decode step in a thread; steps run eagerly until it is ready.

        Returns False (and does nothing) when compile=False, the step is ready or compiling, or
        the device records CUDA graphs (captured in the foreground by warmup()).
        """
        if (not self.compiled or self._compiled_ready or self._compile_thread is not None
                or not self.compiles_in_background):
            return False

        def run() -> None:
            # The compile is mostly Python: make it yield the interpreter lock and the CPU to
            # the thread that decodes, so replies go on at near eager speed meanwhile.
            _lower_thread_priority()
            interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, 0.0005))
            try:
                self._build_compiled()
            except Exception as e:  # a failed compile leaves the eager step in place
                self.compile_error = e
                log.warning("compiling the decode step failed; decoding stays eager (%s)",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
            finally:
                sys.setswitchinterval(interval)

        self._compile_thread = threading.Thread(target=run, name="llamarun-compile", daemon=True)
        self._compile_thread.start()
        return True

    @property
    def compiles_in_background(self) -> bool:
        """Whether compile_in_background() can work here (not where CUDA graphs are recorded,
        which happens in the foreground, nor for a cache too short for the scratch step)."""
        return not uses_cuda_graphs(self.device) and self.max_seq_len >= 4

    @property
    def compiling(self) -> bool:
        """Whether a background compile is still running."""
        return self._compile_thread is not None and self._compile_thread.is_alive()

    @property
    def compiled_ready(self) -> bool:
        """Whether decode steps now run the compiled graph."""
        return self._compiled_ready

    def wait_compiled(self) -> None:
        """Block until the compiled step is ready (compiling it here if nobody started it)."""
        if not self.compiled or self._compiled_ready:
            return
        if self._compile_thread is not None:
            self._compile_thread.join()
            if self.compile_error is not None:
                raise self.compile_error
            return
        self._build_compiled()

    def claim_cache(self) -> int:
        """Note that the KV cache is about to be overwritten; return the new cache version."""
        self.cache_version += 1
        return self.cache_version

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt (BOS when the tokenizer's settings say so)."""
        return self.tokenizer.encode(text, bos=self.tokenizer.add_bos)

    def complete(self, prompt: str | Sequence[int], *, sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), echo: bool = False,
                 logprobs: bool = False) -> Generation:
        """Stream a raw continuation of `prompt` (text, or token ids used as they are)."""
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidArgumentError("the prompt is empty and the tokenizer adds no BOS token")
        self.check_fits(len(ids))
        return self.generate(ids, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop,
                             logprobs=logprobs,
                             echo=prompt if echo and isinstance(prompt, str) else "")

    def check_fits(self, n_tokens: int, start_pos: int = 0) -> None:
        """Raise PromptTooLongError unless n_tokens at start_pos leave room to generate."""
        if start_pos + n_tokens >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {n_tokens} tokens but the context holds {self.max_seq_len} "
                f"(with {start_pos} already used); shorten it or raise --max-seq-len")

    def chat(self, *, system: str | None = None) -> ChatSession:
        """A new conversation that keeps its history in the KV cache."""
        from llamarun.session import ChatSession

        return ChatSession(self, system=system)

    def generate(self, prompt_ids: Sequence[int], *, start_pos: int = 0,
                 history: Sequence[int] = (), sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), logprobs: bool = False,
                 echo: str = "",
                 on_done: Callable[[GenerationResult], None] | None = None) -> Generation:
        """Prefill prompt_ids at start_pos (after `history`, already cached) and stream the reply.

        A non-empty `echo` is yielded first, as a chunk with no token.
        """
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.check_fits(len(prompt_ids), start_pos)
        sampling = sampling or SamplingParams()
        ids = list(prompt_ids)
        self.claim_cache()

        def chunks(gen: Generation) -> Iterator[TextChunk]:
            return self._stream(gen, ids, start_pos=start_pos, history=history, sampling=sampling,
                                max_new_tokens=max_new_tokens, stop=stop, logprobs=logprobs,
                                echo=echo)
        return Generation(chunks, prompt_tokens=len(ids), on_done=on_done)

    def _stream(self, gen: Generation, prompt_ids: list[int], *, start_pos: int,
                history: Sequence[int], sampling: SamplingParams, max_new_tokens: int,
                stop: Sequence[str], logprobs: bool, echo: str) -> Iterator[TextChunk]:
        budget = min(max_new_tokens, self.max_seq_len - start_pos - len(prompt_ids))
        decoder = StreamDecoder(self.tokenizer, stop_strings=stop)
        generator = None if sampling.is_greedy else make_generator(self.device, sampling.seed)
        stop_ids = self.tokenizer.stop_ids
        ids: list[int] = []
        n_events = 0
        reason = "cancelled"
        start = time.perf_counter()
        first = last = start
        events = generate_tokens(self.model, prompt_ids, start_pos=start_pos, sampling=sampling,
                                 generator=generator, max_new_tokens=max_new_tokens,
                                 step=self.decode_step, history=history, logprobs=logprobs,
                                 lookahead=self.lookahead)
        try:
            if echo:
                yield TextChunk(echo, None)
                start = first = last = time.perf_counter()
            for event in events:
                last = time.perf_counter()
                if n_events == 0:
                    first = last
                n_events += 1
                if event.id in stop_ids:
                    reason = "stop"
                    break
                ids.append(event.id)
                yield TextChunk(decoder.push(event.id), event.id, event.logprob)
                if decoder.stopped:
                    reason = "stop"
                    break
            else:
                reason = "length" if n_events >= max_new_tokens else "context"
            if not decoder.stopped:
                tail = decoder.flush()
                if tail:
                    yield TextChunk(tail, None)
        finally:
            events.close()
            # Without lookahead a token is written to the cache by the step after it; with it,
            # by the step queued before it was read back (absent after the last budgeted token).
            if self.lookahead:
                cached = n_events if n_events < budget else n_events - 1
            else:
                cached = n_events - 1
            cached = max(0, min(cached, len(ids)))
            gen._finish(GenerationResult(
                text=decoder.text, finish_reason=reason, prompt_tokens=len(prompt_ids),
                completion_tokens=n_events, token_ids=tuple(ids), cached_tokens=cached,
                prefill_s=(first - start) if n_events else time.perf_counter() - start,
                decode_s=last - first))


def _lower_thread_priority() -> None:
    """Give the calling thread (and the compiler processes it starts) the lowest CPU priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: per thread
    except (AttributeError, OSError):
        pass


def set_compile_cache() -> None:
    """Keep inductor's compiled artefacts in the user's cache folder rather than /tmp, so that a
    later start reuses them (a TORCHINDUCTOR_CACHE_DIR set by the user wins)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(base) / "llamarun" / "inductor"))


def load(path: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         max_seq_len: int | None = None, compile: bool = False, quantize: str = "auto",
         group_size: int = 32) -> Engine:
    """Load a model for generation (see Engine.load)."""
    return Engine.load(path, device=device, dtype=dtype, max_seq_len=max_seq_len, compile=compile,
                       quantize=quantize, group_size=group_size)
