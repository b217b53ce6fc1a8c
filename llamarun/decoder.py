"""Decoder: writes tokens into KV cache slots and returns the logits that follow.

`prefill` writes a run of prompt ids into one slot; `step` writes one token into each of several
slots in one forward pass (a batch of sequences at their own positions). Both keep each slot's
`ids` equal to what its cache row holds. The one-sequence step can run a torch.compile'd graph,
built in the foreground or in a background thread while steps run eagerly.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llamarun.device import compile_options, synchronize, uses_cuda_graphs
from llamarun.errors import PromptTooLongError
from llamarun.model import Transformer
from llamarun.slots import UNKNOWN, Slot

log = logging.getLogger(__name__)

KV_BUCKET = 256  # CUDA-graph steps and prefill chunks attend over the cache rounded up to this
PREFILL_CHUNK = 512  # longer prompts are prefilled in chunks of this many tokens


def kv_bucket(pos: int, max_seq_len: int) -> int:
    """Cache slots to attend over for a query at `pos`: the next multiple of KV_BUCKET, capped."""
    return min(max_seq_len, (pos // KV_BUCKET + 1) * KV_BUCKET)


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor,
                     kv_len: int | None = None, kv_exact: bool = False) -> torch.Tensor:
    """Logits (vocab,) after feeding token (1, 1) at input_pos (1,) of cache row 0 (the function
    torch.compile traces; kv_* as in Transformer.forward)."""
    return model(token, input_pos, kv_len=kv_len, kv_exact=kv_exact)[0, -1]


class Decoder:
    """Prefill and decode steps over a model's KV cache slots (eager, or compiled when asked)."""

    def __init__(self, model: Transformer, *, compile: bool = False) -> None:
        self.model = model
        self.device = model.positions.device
        self.compiled = compile
        self.compile_error: Exception | None = None
        self._compiled_ready = False
        self._compile_thread: threading.Thread | None = None
        self._compiled_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        if compile:
            self._compiled_step = self._make_compiled_step()

    @property
    def max_seq_len(self) -> int:
        """Positions per slot."""
        return self.model.max_seq_len

    @torch.inference_mode()
    def prefill(self, slot: Slot, ids: Sequence[int], *,
                chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
        """Write `ids` after what `slot` holds; return the logits (vocab,) after the last one."""
        n, start = len(ids), len(slot.ids)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if start + n > self.max_seq_len:
            raise PromptTooLongError(f"{start + n} tokens do not fit in the context of "
                                     f"{self.max_seq_len} tokens")
        tokens = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        logits = None
        for i in range(0, n, chunk_size):
            chunk = tokens[i:i + chunk_size]
            end = start + i + chunk.shape[0]
            last = torch.tensor([chunk.shape[0] - 1], device=self.device)
            logits = self.model(chunk[None], self.model.positions[start + i:end], output_idx=last,
                                kv_len=kv_bucket(end - 1, self.max_seq_len), row=slot.index)
            slot.ids.extend(ids[i:i + chunk_size])
        assert logits is not None
        return logits[0, -1]

    @torch.inference_mode()
    def step(self, slots: Sequence[Slot], tokens: torch.Tensor,
             ids: Sequence[int] | None = None) -> torch.Tensor:
        """Write tokens (B,) (host ids `ids`, when known) after what each slot holds; return the
        logits (B, vocab) that follow. Each row's logits are independent of the others'."""
        positions = [len(s.ids) for s in slots]
        if max(positions) >= self.max_seq_len:
            raise PromptTooLongError(f"a sequence is full ({self.max_seq_len} tokens)")
        if len(slots) == 1 and slots[0].index == 0 and self._compiled_ready:
            assert self._compiled_step is not None
            logits = self._compiled_step(tokens, positions[0]).view(1, -1)
        else:
            logits = self.model.decode(tokens, [s.index for s in slots], positions)
        for slot, i in zip(slots, ids if ids is not None else [UNKNOWN] * len(slots)):
            slot.ids.append(i)
        return logits

    # -- the compiled one-sequence step ----------------------------------------------------

    def _make_compiled_step(self) -> Callable[[torch.Tensor, int], torch.Tensor]:
        cuda_graphs = uses_cuda_graphs(self.device)
        set_compile_cache()
        # dynamic=True: one graph serves every attention length. Without CUDA graphs each step
        # attends over exactly the used part of the cache; CUDA graphs record one graph per
        # shape, so there the length is rounded up to a KV_BUCKET and masked.
        # The model's modules never change after loading: checking them before every step (about
        # 1 ms a token for a 30-layer model on CPU) buys nothing.
        options = compile_options(self.device)
        if any(layer.attention.reduce is not None for layer in self.model.layers):
            # A tensor-parallel rank: inductor's C++ wrapper cannot call the collectives.
            options.pop("cpp_wrapper", None)
        skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip_module_guards is not None:  # torch >= 2.7
            options["guard_filter_fn"] = skip_module_guards
        compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=True, options=options)
        model = self.model

        def run(token: torch.Tensor, pos: int) -> torch.Tensor:
            input_pos = torch.tensor([pos], dtype=torch.long, device=self.device)
            token = token.view(1, 1)
            if cuda_graphs:  # CUDA graphs reuse their output buffers: keep a copy
                return compiled(model, token, input_pos, kv_bucket(pos, model.max_seq_len)).clone()
            return compiled(model, token, input_pos, pos + 1, True)
        return run

    def _build(self) -> None:
        # One step at a scratch position near the end of row 0: a real step compiles the graph.
        # (A sequence reaching that position later writes it again before attending to it.)
        assert self._compiled_step is not None
        pos = self.max_seq_len - 2
        with torch.inference_mode():
            self._compiled_step(torch.zeros(1, dtype=torch.long, device=self.device), pos)
        synchronize(self.device)
        self._compiled_ready = True

    def compile_in_background(self) -> bool:
        """Start compiling the step in a thread; steps run eagerly until it is ready.

        Returns False (and does nothing) when compile=False, the step is ready or compiling, or
        the device records CUDA graphs (captured in the foreground by wait_compiled()).
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
                self._build()
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
        """Whether one-sequence steps now run the compiled graph."""
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
        self._build()


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
