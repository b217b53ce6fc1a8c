"""Engine: a loaded model with its tokenizer, chat format, decoder and KV cache slots.

`generate` turns a prompt's ids into a `Generation` of streamed text: it takes a cache slot,
reuses the longest prefix the slot already holds, and runs the token loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from llamarun.decoder import Decoder
from llamarun.device import is_async
from llamarun.errors import InvalidArgumentError, PromptTooLongError
from llamarun.generate import TokenEvent, generate_tokens
from llamarun.generation import Cancelled, Generation, GenerationResult, Reply, Stream, TextChunk
from llamarun.loaders import Checkpoint, TensorParallel, detect_layout, load_checkpoint
from llamarun.sampling import SamplingParams, generator_for
from llamarun.session import ChatSession
from llamarun.slots import Slot, SlotPool
from llamarun.tokenizer import ChatFormat, Tokenizer, load_chat_format, load_tokenizer

__all__ = ["ChatSession", "Engine", "Generation", "GenerationResult", "TextChunk", "load"]


class Engine:
    """A model ready to generate: weights, KV cache slots, tokenizer, chat format and decoder."""

    def __init__(self, checkpoint: Checkpoint, tokenizer: Tokenizer, chat_format: ChatFormat, *,
                 compile: bool = False, load_s: float = 0.0,
                 tp: TensorParallel | None = None) -> None:
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
        self.decoder = Decoder(self.model, compile=compile)
        self.tp = tp  # this rank's collectives in a tensor-parallel job, else None

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", max_seq_len: int | None = None,
             compile: bool = False, chat_template: str | None = None, quantize: str = "auto",
             group_size: int = 32, slots: int = 1,
             progress: Callable[[int, int], None] | None = None,
             tp: TensorParallel | None = None) -> Engine:
        """Load a Meta/HF folder or GGUF file, its tokenizer and its chat format.

        quantize and group_size are as in loaders.load_checkpoint; `slots` sequences can be
        cached at once (max_seq_len positions each); progress(done, total) is called while the
        weights are converted; with `tp` (llamarun.parallel.Collectives) this process holds its
        rank's part of the model, and every rank must run the same generations in step.
        """
        if max_seq_len is not None and max_seq_len < 2:
            raise InvalidArgumentError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if slots < 1:
            raise InvalidArgumentError(f"slots must be at least 1, got {slots}")
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
                   load_s=time.perf_counter() - start, tp=tp)

    @property
    def max_seq_len(self) -> int:
        """Length of the KV cache: the most tokens a prompt and its completion can hold."""
        return self.model.max_seq_len

    @property
    def slots(self) -> SlotPool:
        """The KV cache's rows and what each holds (owned by the model, beside its cache)."""
        return self.model.slots

    def ensure_context(self, n: int) -> None:
        """Grow the KV cache to at least n positions per slot (forgetting what the slots hold)."""
        if n > self.max_seq_len:
            self.model.setup_caches(self.model.max_batch_size, n)

    # -- compiling (see Decoder) -----------------------------------------------------------

    def compile_in_background(self) -> bool:
        """Start compiling the decode step in a thread (see Decoder.compile_in_background)."""
        return self.decoder.compile_in_background()

    def wait_compiled(self) -> None:
        """Block until the compiled step is ready (compiling it here if nobody started it)."""
        self.decoder.wait_compiled()

    @property
    def compiles_in_background(self) -> bool:
        """Whether compile_in_background() can work on this device."""
        return self.decoder.compiles_in_background

    @property
    def compiling(self) -> bool:
        """Whether a background compile is still running."""
        return self.decoder.compiling

    @property
    def compiled_ready(self) -> bool:
        """Whether decode steps now run the compiled graph."""
        return self.decoder.compiled_ready

    @property
    def compile_error(self) -> Exception | None:
        """Why a background compile failed (None if it did not)."""
        return self.decoder.compile_error

    def warmup(self, *, steps: int = 2) -> float:
        """Compile the decode step (when compile=True) and run a few steps; return the seconds."""
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

    def check_fits(self, n_tokens: int) -> None:
        """Raise PromptTooLongError unless a prompt of n_tokens leaves room to generate."""
        if n_tokens >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {n_tokens} tokens but the context holds {self.max_seq_len}; "
                f"shorten it or raise --max-seq-len")

    def complete(self, prompt: str | Sequence[int], *, sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), echo: bool = False,
                 logprobs: bool = False, special: bool = False) -> Generation:
        """Stream a raw continuation of `prompt` (text, or token ids used as they are).

        `special` parses special-token text in a text prompt into control tokens (see encode_prompt).
        """
        ids = self.encode_prompt(prompt, special=special) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidArgumentError("the prompt is empty and the tokenizer adds no BOS token")
        return self.generate(ids, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop,
                             logprobs=logprobs,
                             echo=prompt if echo and isinstance(prompt, str) else "")

    def chat(self, *, system: str | None = None) -> ChatSession:
        """A new conversation that keeps its history in the KV cache."""
        return ChatSession(self, system=system)

    def generate(self, prompt_ids: Sequence[int], *, sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), logprobs: bool = False,
                 echo: str = "",
                 on_done: Callable[[GenerationResult], None] | None = None) -> Generation:
        """Stream the continuation of prompt_ids as text.

        Nothing runs until the Generation is iterated; then it takes a cache slot (from a
        generation still holding it, if all are taken: that one ends "cancelled"), prefills
        only what the slot lacks of the prompt, and decodes. A non-empty `echo` is yielded
        first, as a chunk with no token. on_done(result) is called when it ends.
        """
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = list(prompt_ids)
        if not ids:
            raise InvalidArgumentError("the prompt has no tokens")
        self.check_fits(len(ids))
        stream = self._stream(ids, sampling=sampling or SamplingParams(),
                              max_new_tokens=max_new_tokens, stop=stop, logprobs=logprobs, echo=echo)
        return Generation(stream, prompt_tokens=len(ids), on_done=on_done)

    def token_events(self, prompt_ids: Sequence[int], *, max_new_tokens: int,
                     sampling: SamplingParams | None = None, reuse: bool = True) -> Iterator[TokenEvent]:
        """The raw token loop on a slot of this engine (ids, no text): for benchmarks and tools.
        reuse=False prefills the whole prompt even where a slot holds it already."""
        owner = object()
        slot, _ = self._take_slot(prompt_ids, owner, reuse=reuse)
        sampling = sampling or SamplingParams.greedy()
        try:
            yield from generate_tokens(self.decoder, slot, prompt_ids, sampling=sampling,
                                       generator=generator_for(sampling, self.device),
                                       max_new_tokens=max_new_tokens, lookahead=self.lookahead)
        finally:
            self.slots.release(slot, owner)

    def _take_slot(self, prompt_ids: Sequence[int], owner: object, *,
                   reuse: bool = True) -> tuple[Slot, int]:
        """A cache slot for `owner` (taken from an unfinished generation if all are held), cut
        back to the longest prefix of the prompt it holds (none without `reuse`); with the
        number of prompt ids it keeps."""
        slot = self.slots.acquire(prompt_ids, owner, steal=True)
        assert slot is not None
        if not reuse:
            slot.clear()
        return slot, slot.keep_prefix(prompt_ids)

    def _stream(self, prompt_ids: list[int], *, sampling: SamplingParams, max_new_tokens: int,
                stop: Sequence[str], logprobs: bool, echo: str) -> Stream:
        start = time.perf_counter()
        owner = object()
        slot: Slot | None = None
        reused = 0
        reply = Reply(self.tokenizer, stop=stop, max_new_tokens=max_new_tokens)
        first = last = start
        try:
            if echo:
                yield TextChunk(echo, None)
                start = first = last = time.perf_counter()
            slot, reused = self._take_slot(prompt_ids, owner)
            events = generate_tokens(self.decoder, slot, prompt_ids, sampling=sampling,
                                     generator=generator_for(sampling, self.device),
                                     max_new_tokens=max_new_tokens, logprobs=logprobs,
                                     lookahead=self.lookahead)
            try:
                while reply.finish_reason is None:
                    if slot.owner is not owner:  # a later generation has taken the slot
                        reply.end("cancelled")
                        break
                    event = next(events, None)
                    if event is None:  # the context is full
                        break
                    last = time.perf_counter()
                    if reply.sampled == 0:
                        first = last
                    chunk = reply.push(event.id, event.logprob)
                    if chunk is not None:
                        yield chunk
            finally:
                events.close()
            tail = reply.end("context")
            if tail:
                yield TextChunk(tail, None)
        except Cancelled:
            reply.end("cancelled")
        finally:
            if slot is not None:
                self.slots.release(slot, owner)
        return GenerationResult(
            text=reply.text, finish_reason=reply.finish_reason or "cancelled",
            prompt_tokens=len(prompt_ids), reused_tokens=reused, completion_tokens=reply.sampled,
            token_ids=tuple(reply.ids),
            prefill_s=(first - start) if reply.sampled else time.perf_counter() - start,
            decode_s=last - first)


def load(path: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         max_seq_len: int | None = None, compile: bool = False, quantize: str = "auto",
         group_size: int = 32, slots: int = 1) -> Engine:
    """Load a model for generation (see Engine.load)."""
    return Engine.load(path, device=device, dtype=dtype, max_seq_len=max_seq_len, compile=compile,
                       quantize=quantize, group_size=group_size, slots=slots)
