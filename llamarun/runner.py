"""Runner: the one way tokens get into the KV cache and logits come out.

`run(writes)` takes several slots' new tokens (a decode row has one, a prefill chunk many, a
verification a few), runs them through one forward pass (Transformer.forward_spans), records
what it wrote in the cache manager, and returns the logits asked for. A pass whose rows each
carry one token (a decode step) can run a torch.compile'd graph instead: one graph per batch
bucket (1, 2, 4, 8, ... rows; a batch is padded to its bucket by repeating its last row), every
attention length served by the same graph. On CUDA the decode step attends over windows of
fixed size instead (decode_window), so that its passes replay from CUDA graphs
(llamarun.graphs). The graphs are compiled in the foreground or in a background thread while
passes run eagerly; the scheduler decides when to switch.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llamarun.cache_manager import CacheManager, Slot
from llamarun import device as devices
from llamarun.device import compile_options, synchronize
from llamarun.errors import PromptTooLongError
from llamarun.graphs import GraphedDecode
from llamarun.model import Span, Step, Transformer

log = logging.getLogger(__name__)

ROW_BIAS = 2  # a compiled step's rows are passed as row + 2: no input is 0 or 1 (see model.Step)
MIN_WINDOW = 64  # the shortest attention window of a recorded decode step (see windows)


@dataclass(frozen=True)
class Write:
    """Token ids to write after what `slot` holds; logits wanted for the tokens logits[0]..
    logits[1]-1 of them (counted within `ids`; an empty range: none)."""

    slot: Slot
    ids: Sequence[int]
    logits: tuple[int, int]

    @classmethod
    def last(cls, slot: Slot, ids: Sequence[int]) -> Write:
        """Write `ids`, with the logits after the last one."""
        return cls(slot, ids, (len(ids) - 1, len(ids)))

    @classmethod
    def silent(cls, slot: Slot, ids: Sequence[int]) -> Write:
        """Write `ids` without computing any logits (a prefill chunk before the last)."""
        return cls(slot, ids, (0, 0))


def buckets(max_rows: int) -> list[int]:
    """The batch sizes compiled decode steps are built for: powers of two up to max_rows."""
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(min(sizes[-1] * 2, max_rows))
    return sizes


def bucket_for(rows: int, max_rows: int) -> int:
    """The smallest bucket holding `rows` rows."""
    return next(b for b in buckets(max_rows) if b >= rows)


def decode_rows(model: Transformer, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                biased_rows: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    """Logits (B, vocab) after token i (B,) at pos[i] of cache row rows[i] (the function that
    torch.compile traces: the Python ints arrive as symbols, so one graph serves every row and
    length; biased_rows are rows + ROW_BIAS, lengths are pos + 1 >= 2)."""
    spans = tuple(Span(r, n - 1, 1) for r, n in zip(biased_rows, lengths))
    step = Step(rows, pos, spans, (None,) * len(spans), ROW_BIAS)
    return model.run_step(tokens, step)


def decode_window(model: Transformer, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                  window: int) -> torch.Tensor:
    """Logits (B, vocab) after token i (B,) at pos[i] < window of cache row rows[i], every row
    attending over the first `window` positions of its row masked to its past: no shape
    depends on the positions, so a CUDA graph recorded once per batch and window bucket
    replays for every position in the window (see GraphedDecode)."""
    mask = model.positions[None, :window] <= pos[:, None]
    step = Step(rows, pos, (), (mask[:, None, None, :],), window=window)
    return model.run_step(tokens, step)


def windows(max_seq_len: int) -> list[int]:
    """The attention windows of recorded decode steps: powers of two from MIN_WINDOW up, the
    last one max_seq_len."""
    sizes = [min(MIN_WINDOW, max_seq_len)]
    while sizes[-1] < max_seq_len:
        sizes.append(min(sizes[-1] * 2, max_seq_len))
    return sizes


def window_for(positions: int, max_seq_len: int) -> int:
    """The smallest window holding `positions` positions."""
    return next(w for w in windows(max_seq_len) if w >= positions)


def verify_rows(model: Transformer, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                biased_rows: tuple[int, ...], ends: tuple[int, ...],
                lengths: tuple[int, ...]) -> torch.Tensor:
    """Logits (T, vocab) after every token of rows of several tokens each (speculative
    verification): row i's lengths[i] >= 2 tokens at positions ends[i] - lengths[i].. of cache row
    biased_rows[i] - ROW_BIAS, each attending causally over its row's past (traced by
    torch.compile with every int a symbol, as decode_rows)."""
    spans = tuple(Span(r, e - n, n) for r, e, n in zip(biased_rows, ends, lengths))
    positions = model.positions
    masks = tuple(positions[None, :e] <= positions[e - n:e, None] for e, n in zip(ends, lengths))
    return model.run_step(tokens, Step(rows, pos, spans, masks, ROW_BIAS))


def mixed_rows(model: Transformer, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
               biased_rows: tuple[int, ...], lengths: tuple[int, ...], chunk_row: int,
               chunk_end: int, chunk_len: int) -> torch.Tensor:
    """Decode rows as decode_rows, followed by one prefill chunk of chunk_len >= 2 tokens at
    positions chunk_end - chunk_len.. of cache row chunk_row - ROW_BIAS attending causally over
    its row's past; logits (B + 1, vocab): each decode row's, then the chunk's last token's
    (traced by torch.compile with every int a symbol)."""
    spans = tuple(Span(r, n - 1, 1) for r, n in zip(biased_rows, lengths))
    spans += (Span(chunk_row, chunk_end - chunk_len, chunk_len),)
    positions = model.positions
    mask = positions[None, :chunk_end] <= positions[chunk_end - chunk_len:chunk_end, None]
    b = len(biased_rows)
    wanted = torch.cat([positions[:b], positions[b + chunk_len - 1:b + chunk_len]])
    step = Step(rows, pos, spans, (None,) * b + (mask,), ROW_BIAS)
    return model.run_step(tokens, step, wanted)


def is_mixed(writes: Sequence[Write]) -> bool:
    """Whether a pass is decode rows (one token each, its logits) followed by one prefill chunk
    (two tokens or more; its last token's logits or none): what mixed_rows computes."""
    *decode, chunk = writes
    n = len(chunk.ids)
    return (bool(decode) and all(len(w.ids) == 1 and w.logits == (0, 1) for w in decode)
            and n >= 2 and chunk.logits in ((n - 1, n), (0, 0)))


class Runner:
    """Forward passes over a model's KV cache, recorded in its cache manager."""

    def __init__(self, model: Transformer, cache: CacheManager, *, compile: bool = False,
                 mix: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.device = model.positions.device
        self.compiled = compile
        self.compile_error: Exception | None = None
        self._compiled_ready = False
        self._compile_thread: threading.Thread | None = None
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.graphed: GraphedDecode | None = None  # CUDA: the compiled decode step's graphs
        self._verify: Callable[..., torch.Tensor] | None = None  # see enable_verify
        self._mixed: Callable[..., torch.Tensor] | None = None  # decode rows + a prefill chunk
        # mix: compile graphs for decode passes that carry a prompt chunk (the scheduler's;
        # a draft model's runner has no use for them). A chunk can share a pass only with other
        # slots' decode rows.
        self.mix = mix and len(cache) > 1
        # CUDA: one-token passes replay graphs of the eager decode_window until compiled ones
        # take over.
        self._building = False  # _build runs: no graph is recorded (see _graphed_run)
        self.eager_graphed: GraphedDecode | None = None
        self._eager: Callable[..., torch.Tensor] | None = None
        if self._graphs_serve():
            self._eager, self.eager_graphed = self._graphed_run(decode_window)
        if compile:
            self._compiled = self._make_compiled()

    @property
    def max_seq_len(self) -> int:
        """Positions per slot."""
        return self.model.max_seq_len

    def run(self, writes: Sequence[Write], *, compiled: bool = False) -> torch.Tensor:
        """Write each slot's ids after what it holds, in one forward pass; return the logits
        (sum of the wanted counts, vocab) asked for, in order. With `compiled`, a pass of
        one-token writes runs the compiled graph of its bucket (it must be ready)."""
        if not torch.is_inference_mode_enabled():  # (the scheduler's passes run in it already:
            with torch.inference_mode():  # entering it again cost a decode token 0.2%)
                return self.run(writes, compiled=compiled)
        spans = []
        for w in writes:
            start = len(w.slot.ids)
            if start + len(w.ids) > self.max_seq_len:
                raise PromptTooLongError(f"{start + len(w.ids)} tokens do not fit in the context "
                                         f"of {self.max_seq_len} tokens")
            if not w.ids:
                raise ValueError("a write needs at least one token")
            spans.append(Span(w.slot.index, start, len(w.ids)))
        tokens = torch.tensor([i for w in writes for i in w.ids], dtype=torch.long,
                              device=self.device)
        one_token = all(len(w.ids) == 1 and w.logits == (0, 1) for w in writes)
        if compiled and one_token:
            if not self._compiled_ready or self._compiled is None:
                raise RuntimeError("the compiled step is not ready")
            logits = self._compiled(tokens, spans)
        elif (compiled and self._verify is not None and self._compiled_ready
              and all(len(w.ids) >= 2 and w.logits == (0, len(w.ids)) for w in writes)):
            logits = self._verify(tokens, spans)
        elif compiled and self._mixed is not None and self._compiled_ready and is_mixed(writes):
            logits = self._mixed(tokens, spans)
            if writes[-1].logits == (0, 0):  # a chunk before the prompt's last: none wanted
                logits = logits[:-1]
        elif one_token and self._eager is not None:
            logits = self._eager(tokens, spans)
        elif one_token:  # every row's logits, in order: no index to make or apply
            logits = self.model.forward_spans(tokens, spans)
        else:
            index, offset = [], 0
            for w in writes:
                index.extend(range(offset + w.logits[0], offset + w.logits[1]))
                offset += len(w.ids)
            out = torch.tensor(index, dtype=torch.long, device=self.device)
            logits = self.model.forward_spans(tokens, spans, output_idx=out)
        for w, s in zip(writes, spans):
            self.cache.record(w.slot, s.start, w.ids)
        return logits

    # -- the compiled decode step ----------------------------------------------------------

    def _make_compiled(self) -> Callable[..., torch.Tensor]:
        devices.configure_compile_cache()
        # dynamic=True: rows and lengths are symbols, so a bucket's one graph serves every
        # position. The model's modules never change after loading: checking them before
        # every step (about 1 ms a token for a 30-layer model on CPU) buys nothing.
        options = compile_options(self.device)
        if any(layer.attention.reduce is not None for layer in self.model.layers):
            # A tensor-parallel rank: inductor's C++ wrapper cannot call the collectives.
            options.pop("cpp_wrapper", None)
        skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip_module_guards is not None:  # torch >= 2.7
            options["guard_filter_fn"] = skip_module_guards
        self._options = options
        model = self.model
        max_rows = model.max_batch_size
        if self._graphs_serve():
            compiled_window = torch.compile(_own_copy(decode_window), fullgraph=True,
                                            dynamic=True, options=options)
            run, self.graphed = self._graphed_run(compiled_window)
            return run
        compiled = torch.compile(_own_copy(decode_rows), fullgraph=True, dynamic=True,
                                 options=options)

        def run(tokens: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
            n = len(spans)
            tokens, padded = _pad_to_bucket(tokens, spans, max_rows)
            rows = torch.tensor([s.row for s in padded], dtype=torch.long, device=self.device)
            pos = torch.tensor([s.start for s in padded], dtype=torch.long, device=self.device)
            logits = compiled(model, tokens, rows, pos, tuple(s.row + ROW_BIAS for s in padded),
                              tuple(s.start + 1 for s in padded))
            return logits[:n]
        return run

    def _graphs_serve(self) -> bool:
        """Whether decode passes replay CUDA graphs here (CUDA, no tensor parallelism: the
        collectives stay outside graphs)."""
        return devices.uses_cuda_graphs(self.device) and not any(
            layer.attention.reduce is not None for layer in self.model.layers)

    def _graphed_run(self, fn: Callable[..., torch.Tensor],
                     ) -> tuple[Callable[..., torch.Tensor], GraphedDecode]:
        """A decode step running `fn` (decode_window, compiled or not) through CUDA graphs per
        batch bucket and attention window (llamarun.graphs), and its GraphedDecode. No graph
        is recorded while the compiled graphs are built: not their scratch passes, and not
        from another thread while a background build uses the GPU (capture forbids that)."""
        graphed = GraphedDecode(self.model, fn, can_record=lambda: not self._building)
        model = self.model
        max_rows = model.max_batch_size

        def run(tokens: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
            n = len(spans)
            tokens, padded = _pad_to_bucket(tokens, spans, max_rows)
            rows = torch.tensor([s.row for s in padded], dtype=torch.long, device=self.device)
            pos = torch.tensor([s.start for s in padded], dtype=torch.long, device=self.device)
            window = window_for(max(s.start for s in padded) + 1, model.max_seq_len)
            return graphed(tokens, rows, pos, window)[:n]
        return run, graphed

    def _make_verify(self) -> Callable[..., torch.Tensor]:
        compiled = torch.compile(_own_copy(verify_rows), fullgraph=True, dynamic=True,
                                 options=self._options)
        model = self.model
        max_rows = model.max_batch_size

        def run(tokens: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
            total = int(tokens.shape[0])
            tokens, padded = _pad_to_bucket(tokens, spans, max_rows)
            rows = torch.tensor([s.row for s in padded for _ in range(s.length)],
                                dtype=torch.long, device=self.device)
            pos = torch.cat([model.positions[s.start:s.end] for s in padded])
            logits = compiled(model, tokens, rows, pos, tuple(s.row + ROW_BIAS for s in padded),
                              tuple(s.end for s in padded), tuple(s.length for s in padded))
            return logits[:total]
        return run

    def _make_mixed(self) -> Callable[..., torch.Tensor]:
        compiled = torch.compile(_own_copy(mixed_rows), fullgraph=True, dynamic=True,
                                 options=self._options)
        model = self.model
        max_rows = model.max_batch_size

        def run(tokens: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
            *decode, chunk = spans
            n = len(decode)
            head, padded = _pad_to_bucket(tokens[:n], decode, max_rows)
            tokens = torch.cat([head, tokens[n:]])
            rows = torch.tensor([s.row for s in padded] + [chunk.row] * chunk.length,
                                dtype=torch.long, device=self.device)
            pos = torch.cat([torch.tensor([s.start for s in padded], dtype=torch.long,
                                          device=self.device),
                             model.positions[chunk.start:chunk.end]])
            logits = compiled(model, tokens, rows, pos, tuple(s.row + ROW_BIAS for s in padded),
                              tuple(s.start + 1 for s in padded), chunk.row + ROW_BIAS,
                              chunk.end, chunk.length)
            return torch.cat([logits[:n], logits[-1:]])
        return run

    def enable_verify(self) -> None:
        """Compile verification graphs too (before the compile starts: speculative decoding)."""
        if self.compiled and self._verify is None:
            self._verify = self._make_verify()

    def _build(self) -> None:
        self._building = True  # no CUDA graph is recorded meanwhile (see _graphed_run)
        try:
            self._build_graphs()
        finally:
            self._building = False

    def _build_graphs(self) -> None:
        # One step per bucket at scratch positions near the end of the rows compiles its graph.
        # (A sequence reaching those positions later writes them again before attending to them.)
        assert self._compiled is not None
        pos = self.max_seq_len - 2
        slots = len(self.cache)
        with torch.inference_mode():
            for size in buckets(self.model.max_batch_size):
                spans = [Span(i % slots, pos, 1) for i in range(size)]
                tokens = torch.zeros(size, dtype=torch.long, device=self.device)
                self._compiled(tokens, spans)
            if self._verify is not None and self.max_seq_len >= 8:
                # Rows of 2 and 3 tokens ending at different scratch positions: every length
                # and position is a symbol of the one graph per bucket.
                for size in buckets(self.model.max_batch_size):
                    spans = [Span(i % slots, self.max_seq_len - 5 + i % 2, 2 + i % 2)
                             for i in range(size)]
                    tokens = torch.zeros(sum(s.length for s in spans), dtype=torch.long,
                                         device=self.device)
                    self._verify(tokens, spans)
            if self.mix and self.max_seq_len >= 8:
                self._mixed = self._make_mixed()
                # Decode rows and a chunk of 2 or 3 tokens in another slot, at scratch positions.
                for size in buckets(self.model.max_batch_size):
                    n = 2 + size % 2
                    spans = [Span(i % (slots - 1), pos, 1) for i in range(size)]
                    spans.append(Span(slots - 1, self.max_seq_len - 1 - n, n))
                    tokens = torch.zeros(size + n, dtype=torch.long, device=self.device)
                    self._mixed(tokens, spans)
        synchronize(self.device)
        self._compiled_ready = True

    def compile_in_background(self) -> bool:
        """Start compiling the decode graphs in a thread; passes run eagerly until they are
        ready. Returns False (and does nothing) when compile=False, the graphs are ready or
        compiling, or the cache is too short for the scratch steps."""
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
        """Whether compile_in_background() can work here (a cache long enough for the scratch
        steps)."""
        return self.max_seq_len >= 4

    @property
    def compiling(self) -> bool:
        """Whether a background compile is still running."""
        return self._compile_thread is not None and self._compile_thread.is_alive()

    @property
    def compiled_ready(self) -> bool:
        """Whether the compiled decode graphs are built."""
        return self._compiled_ready

    def wait_compiled(self) -> None:
        """Block until the compiled graphs are ready (compiling them here if nobody started)."""
        if not self.compiled or self._compiled_ready:
            return
        if self._compile_thread is not None:
            self._compile_thread.join()
            if self.compile_error is not None:
                raise self.compile_error
            return
        self._build()


def _pad_to_bucket(tokens: torch.Tensor, spans: Sequence[Span],
                   max_rows: int) -> tuple[torch.Tensor, list[Span]]:
    """The packed tokens and spans of a pass padded to its batch bucket by repeating the last
    span (a repeat writes the same values at the same positions)."""
    extra = bucket_for(len(spans), max_rows) - len(spans)
    if not extra:
        return tokens, list(spans)
    last = tokens[tokens.shape[0] - spans[-1].length:]
    return torch.cat([tokens, *[last] * extra]), list(spans) + [spans[-1]] * extra


_copies = itertools.count()


def _own_copy(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` with a code object of its own. Dynamo keeps its compiled graphs on the code object,
    and the graphs skip the guards on the model's modules (above): two runners compiling the
    same function (a target and its draft model, two engines in one process) would otherwise
    run one model's graph on the other's weights."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)


def _lower_thread_priority() -> None:
    """Give the calling thread (and the compiler processes it starts) the lowest CPU priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: per thread
    except (AttributeError, OSError):
        pass
