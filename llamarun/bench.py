"""Throughput benchmark: prefill and decode tokens/s, latency percentiles, memory and bandwidth.

Warm-up (and compilation) runs first and is timed apart; it never counts in throughput.
"""

from __future__ import annotations

import logging
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llamarun.device import (
    device_name, peak_device_memory, reset_peak_device_memory, runtime_version, synchronize,
)
from llamarun.engine import Engine
from llamarun.errors import CheckpointError, InvalidArgumentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over repetitions."""

    mean: float
    std: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """Summarise `values` (std 0 for a single value)."""
        vals = tuple(values)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return cls(statistics.fmean(vals), std, vals)


@dataclass(frozen=True)
class PrefillStats:
    """Prefill of `prompt_tokens` tokens (pp512 style): tok/s and time to first token."""

    prompt_tokens: int
    tok_s: Stat
    time_to_first_token_s: Stat


@dataclass(frozen=True)
class DecodeStats:
    """Decoding `gen_tokens` tokens (tg128 style) after a one-token prompt."""

    gen_tokens: int
    tok_s: Stat
    seconds: Stat  # decode time per repetition: gen_tokens / tok_s
    time_per_token_p50_s: float  # over every token of every repetition
    time_per_token_p90_s: float
    bandwidth_gb_s: float  # weight bytes read per token x mean tok/s


@dataclass(frozen=True)
class BenchStep:
    """What run_bench is about to do (for a progress display): step `index` of `total`."""

    name: str  # "pp512" (prefill of 512 tokens) or "tg128" (decoding 128)
    repetition: int  # 1..repetitions; 0 during the warm-up (and compile)
    repetitions: int
    index: int
    total: int


@dataclass(frozen=True)
class BenchResult:
    """Everything `llamarun bench --tokens-per-sec` reports."""

    model: str
    layout: str
    n_params: int
    model_bytes: int  # all weights (a tied embedding once)
    bytes_per_token: int  # weight bytes read per decoded token (embedding: one row)
    dtype: str
    device: str
    compiled: bool  # the decode runs ran the compiled graphs
    repetitions: int
    load_s: float
    warmup_s: float  # warm-up and compilation, not in any throughput
    prefill: tuple[PrefillStats, ...]
    decode: DecodeStats
    peak_rss_bytes: int
    peak_device_bytes: int | None
    env: dict[str, object] = field(default_factory=dict)
    # A tensor-parallel run: world size, the share of decode time in collectives (the slowest
    # rank's), and each rank's peak host / device memory.
    tensor_parallel: dict[str, object] | None = None
    # Speculative decoding: its kind, acceptance rate, tokens per target step, and the decode
    # speed of the same runs without drafts (measured after them) with the speed-up.
    speculative: dict[str, object] | None = None
    # The device's plain memory read (llamarun.memory_read), when asked for: its GB/s, form and
    # ordinary-memory GB/s, and the decode's weight stream over it (decode_vs_read).
    memory_read: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data."""
        return asdict(self)


def weight_bytes(engine: Engine) -> tuple[int, int]:
    """(bytes of all weights, bytes read per decoded token)."""
    model = engine.model
    seen: set[int] = set()  # a tied embedding is counted once
    total = 0
    # Quantized weights and their scales are buffers; the KV cache and RoPE tables are not weights.
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "kv_cache" in name or name in ("freqs", "positions") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    emb = model.tok_embeddings.weight
    per_token = total
    if model.output.weight is not emb:  # the lookup reads one row, not the whole table
        per_token -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total, per_token


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image.

    Linux's VmHWM where there is one: ru_maxrss carries a forking parent's peak across exec, so a
    process started from a large one would report at least the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def environment(engine: Engine) -> dict[str, object]:
    """Versions and settings that make numbers comparable."""
    from llamarun import __version__

    env: dict[str, object] = {
        "llamarun": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device_name": device_name(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
    }
    cuda = runtime_version(engine.device)
    if cuda is not None:
        env["cuda"] = cuda
    return env


def _prefill_once(engine: Engine, ids: list[int]) -> float:
    synchronize(engine.device)
    start = time.perf_counter()
    for _ in engine.token_events(ids, max_new_tokens=1, reuse=False):
        pass  # the first token's id on the host ends the prefill
    return time.perf_counter() - start


def _decode_once(engine: Engine, first: int, n: int) -> list[float]:
    """Per-token seconds of n decode steps after a one-token prefill."""
    stamps: list[float] = []
    for _ in engine.token_events([first], max_new_tokens=n + 1, reuse=False):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bench_context(prompt_tokens: Sequence[int], gen_tokens: int) -> int:
    """Positions the benchmark needs: the longest prompt and its first token, or one token and
    gen_tokens decoded after it."""
    return max(max(prompt_tokens) + 1, gen_tokens + 2)


def check_bench_context(engine: Engine, *, prompt_tokens: Sequence[int], gen_tokens: int) -> None:
    """Before the benchmark starts: a KV cache grown to hold its lengths must fit in memory
    (InvalidArgumentError naming the lengths otherwise); beyond the model's trained context a
    warning says so (speed is still measured there, the text would not be meaningful)."""
    need = bench_context(prompt_tokens, gen_tokens)
    if need <= engine.max_seq_len:
        return
    lengths = f"--prompt-tokens {max(prompt_tokens)} and --gen-tokens {gen_tokens}"
    from llamarun.preflight import check_memory

    try:
        check_memory(engine.args, device=engine.device, dtype=engine.dtype, max_seq_len=need,
                     slots=engine.model.max_batch_size, formats=engine.checkpoint.formats)
    except CheckpointError as e:
        raise InvalidArgumentError(f"{lengths} need a KV cache of {need} positions: {e}") from None
    if need > engine.args.max_seq_len:
        log.warning("%s need %d positions, beyond the model's trained context of %d tokens",
                    lengths, need, engine.args.max_seq_len)


def run_bench(engine: Engine, *, prompt_tokens: Sequence[int] = (512,), gen_tokens: int = 128,
              repetitions: int = 3, seed: int = 0, memory_read: bool = False,
              progress: Callable[[BenchStep], None] | None = None) -> BenchResult:
    """Benchmark prefill at each prompt length and decoding of gen_tokens, after a warm-up.

    Prompts are random token ids (seeded). The KV cache grows if the lengths need more room.
    progress(step) is called before each warm-up or measured step. With memory_read, the
    device's plain memory read is timed last (after the peak memory is taken) and the decode's
    weight stream compared with it.
    """
    if not prompt_tokens or min(prompt_tokens) < 1:
        raise InvalidArgumentError("prompt lengths must be positive integers")
    if gen_tokens < 1 or repetitions < 1:
        raise InvalidArgumentError("gen_tokens and repetitions must be at least 1")
    check_bench_context(engine, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens)
    engine.ensure_context(bench_context(prompt_tokens, gen_tokens))
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.args.vocab_size
    prompts = {n: torch.randint(vocab, (n,), generator=gen).tolist() for n in prompt_tokens}
    first = engine.tokenizer.bos_id if engine.tokenizer.bos_id is not None else 0

    total = (len(prompts) + 1) * (repetitions + 1)
    if engine.speculator is not None:
        total += repetitions  # the decode runs again without drafts
    if memory_read:
        total += 1
    counter = iter(range(1, total + 1))

    def report(name: str, rep: int) -> None:
        if progress is not None:
            progress(BenchStep(name, rep, repetitions, next(counter), total))

    start = time.perf_counter()
    for i, (n, ids) in enumerate(prompts.items()):
        report(f"pp{n}", 0)
        if i == 0:  # a compiled engine is measured compiled, its compile time apart
            engine.wait_compiled()
        _prefill_once(engine, ids)
    report(f"tg{min(4, gen_tokens)}", 0)
    _decode_once(engine, first, min(4, gen_tokens))
    warmup_s = time.perf_counter() - start

    reset_peak_device_memory(engine.device)
    tp = engine.tp
    timed_s = 0.0  # wall time of the decode runs, their first step included
    if tp is not None:
        tp.seconds = 0.0
    pp_times: dict[int, list[float]] = {n: [] for n in prompt_tokens}
    tg_tok_s: list[float] = []
    tg_seconds: list[float] = []
    per_token: list[float] = []
    spec = engine.speculator
    counts = _spec_counts(engine)
    for rep in range(1, repetitions + 1):
        for n, ids in prompts.items():
            report(f"pp{n}", rep)
            pp_times[n].append(_prefill_once(engine, ids))
        report(f"tg{gen_tokens}", rep)
        if tp is not None:
            tp.timing = True
        began = time.perf_counter()
        steps = _decode_once(engine, first, gen_tokens)
        timed_s += time.perf_counter() - began  # what the collectives' time is a share of
        if tp is not None:
            tp.timing = False
        tg_seconds.append(sum(steps))
        tg_tok_s.append(len(steps) / sum(steps))
        per_token.extend(steps)

    speculative = None
    if spec is not None:
        drafted, accepted, steps = (b - a for a, b in zip(counts, _spec_counts(engine)))
        engine.scheduler.speculator = None  # the same decode runs without drafts
        try:
            plain = []
            for rep in range(1, repetitions + 1):
                report(f"tg{gen_tokens} plain", rep)
                times = _decode_once(engine, first, gen_tokens)
                plain.append(len(times) / sum(times))
        finally:
            engine.scheduler.speculator = spec
        plain_tok_s = Stat.of(plain)
        speculative = {
            "kind": spec.kind, "draft_tokens": spec.config.draft_tokens,
            "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else 0.0,
            "tokens_per_step": repetitions * gen_tokens / steps if steps else 0.0,
            "plain_tok_s": asdict(plain_tok_s),
            "speedup": statistics.fmean(tg_tok_s) / plain_tok_s.mean}
    model_bytes, per_tok = weight_bytes(engine)
    tok_s = Stat.of(tg_tok_s)
    q = statistics.quantiles(per_token, n=10, method="inclusive") if len(per_token) > 1 else per_token * 9
    decode = DecodeStats(
        gen_tokens=gen_tokens, tok_s=tok_s, seconds=Stat.of(tg_seconds),
        time_per_token_p50_s=statistics.median(per_token), time_per_token_p90_s=q[8],
        bandwidth_gb_s=per_tok * tok_s.mean / 1e9)
    prefill = tuple(PrefillStats(n, Stat.of([n / t for t in ts]), Stat.of(ts))
                    for n, ts in pp_times.items())
    peak_rss, peak_device = peak_rss_bytes(), peak_device_memory(engine.device)
    tensor_parallel = _tensor_parallel_stats(engine, timed_s)  # each rank's peaks, before the read
    read = None
    if memory_read:
        report("memory read", 1)
        read = _memory_read(engine.device, decode.bandwidth_gb_s)
    return BenchResult(
        model=str(engine.checkpoint.path), layout=engine.checkpoint.layout,
        n_params=engine.args.n_params, model_bytes=model_bytes, bytes_per_token=per_tok,
        dtype=str(engine.dtype).removeprefix("torch."), device=str(engine.device),
        compiled=engine.compiled_in_use, repetitions=repetitions, load_s=engine.load_s,
        warmup_s=warmup_s, prefill=prefill, decode=decode, peak_rss_bytes=peak_rss,
        peak_device_bytes=peak_device, env=environment(engine),
        tensor_parallel=tensor_parallel, speculative=speculative, memory_read=read)


def _memory_read(device: torch.device, decode_gb_s: float) -> dict[str, object]:
    """The device's plain memory read and the decode's GB/s over it; where its buffers cannot
    be had (a machine short of memory), {"error": why}: the measured runs are kept."""
    from llamarun import memory_read

    try:
        read = memory_read.measure(device)
    except (RuntimeError, MemoryError, OSError) as e:
        text = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {text[0] if text else 'no memory'}"}
    return {"gb_s": read.gb_s, "form": read.form, "plain_gb_s": read.plain_gb_s,
            "bytes": read.nbytes, "decode_vs_read": decode_gb_s / read.gb_s}


def _spec_counts(engine: Engine) -> tuple[int, int, int]:
    """(tokens drafted, tokens accepted, target decode passes) so far."""
    spec = engine.speculator
    if spec is None:
        return 0, 0, 0
    return spec.drafted, spec.accepted, engine.scheduler.steps


def _tensor_parallel_stats(engine: Engine, decode_s: float) -> dict[str, object] | None:
    """World size, collective share of decode time and memory per rank (None outside a job)."""
    tp = engine.tp
    if tp is None:
        return None
    from llamarun.parallel import gather_object

    mine = {"rank": tp.rank, "peak_rss_bytes": peak_rss_bytes(),
            "peak_device_bytes": peak_device_memory(engine.device),
            "collective_s": tp.seconds, "decode_s": decode_s}
    ranks = gather_object(mine)
    share = max(float(r["collective_s"]) / max(float(r["decode_s"]), 1e-9) for r in ranks)
    return {"world": tp.world, "collective_share": share, "ranks": ranks}
