"""`llamarun bench --tokens-per-sec`: prefill/decode throughput, latency, memory and bandwidth."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from llamarun.bench import BenchResult, BenchStep, bench_context, run_bench
from llamarun.cli import app, console, settings
from llamarun.cli.common import load_engine
from llamarun.cli.options import ModelOptions, SpecOptions, model_command
from llamarun.errors import InvalidArgumentError

FORMATS = ("table", "md", "json", "jsonl")


def parse_lengths(text: str) -> list[int]:
    """'512,128' -> [512, 128]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise InvalidArgumentError(
            f"--prompt-tokens must be positive integers like 512,128, got {text!r}")
    return values


def rows(r: BenchResult) -> list[tuple[str, str]]:
    """(metric, value) rows shared by the table and Markdown outputs."""
    def ms(s: float) -> str:
        return f"{s * 1e3:.2f} ms"

    def spread(text: str, std: str) -> str:  # one repetition has no spread to show
        return text if r.repetitions == 1 else f"{text} ± {std}"

    out = [
        ("model", f"{r.model} ({r.layout}, {r.n_params / 1e6:.2f} M params, "
                  f"{r.model_bytes / 2**20:.1f} MiB)"),
        ("device / dtype", f"{r.env.get('device_name')} ({r.device}), {r.dtype}, "
                           f"{r.env.get('threads')} threads, {'compiled' if r.compiled else 'eager'}"),
        ("load", f"{r.load_s:.2f} s"),
        ("warm-up (and compile)", f"{r.warmup_s:.2f} s"),
    ]
    for p in r.prefill:
        out.append((f"pp{p.prompt_tokens}",
                    spread(f"{p.tok_s.mean:.1f}", f"{p.tok_s.std:.1f}") + " tok/s"))
        out.append((f"time to first token ({p.prompt_tokens} tok)",
                    spread(ms(p.time_to_first_token_s.mean), ms(p.time_to_first_token_s.std))))
    d = r.decode
    out += [
        (f"tg{d.gen_tokens}", spread(f"{d.tok_s.mean:.1f}", f"{d.tok_s.std:.1f}") + " tok/s"),
        ("time per output token p50 / p90",
         f"{ms(d.time_per_token_p50_s)} / {ms(d.time_per_token_p90_s)}"),
        ("memory bandwidth", f"{d.bandwidth_gb_s:.2f} GB/s "
                             f"({r.bytes_per_token / 2**20:.1f} MiB of weights per token)"),
    ]
    m = r.memory_read
    if m is not None and "error" in m:
        out.append(("memory read", f"not measured ({m['error']})"))
    elif m is not None:
        out.append(("memory read", f"{float(m['gb_s']):.2f} GB/s ({m['form']}; "  # type: ignore[arg-type]
                    f"decode streams {float(m['decode_vs_read']):.2f} of it)"))  # type: ignore[arg-type]
    out += [
        ("peak host RSS", f"{r.peak_rss_bytes / 2**20:.0f} MiB"),
    ]
    if r.peak_device_bytes is not None:
        out.append(("peak device memory", f"{r.peak_device_bytes / 2**20:.0f} MiB"))
    if r.tensor_parallel is not None:
        tp = r.tensor_parallel
        ranks = tp["ranks"]  # type: ignore[index]
        out.append(("tensor parallel", f"{tp['world']} ranks, "
                    f"{100 * float(tp['collective_share']):.1f}% of decode time in collectives"))
        out.append(("peak host RSS per rank", ", ".join(
            f"{int(x['peak_rss_bytes']) / 2**20:.0f} MiB" for x in ranks)))  # type: ignore[union-attr]
    if r.speculative is not None:
        sp = r.speculative
        plain = sp["plain_tok_s"]
        out.append(("speculative decoding", f"{sp['kind']}, up to {sp['draft_tokens']} drafted "
                    f"tokens a step: {100 * float(sp['acceptance']):.1f}% accepted "  # type: ignore[arg-type]
                    f"({sp['accepted']} of {sp['drafted']}), "
                    f"{float(sp['tokens_per_step']):.2f} tokens per target step"))  # type: ignore[arg-type]
        out.append((f"tg{d.gen_tokens} without drafts", spread(
            f"{plain['mean']:.1f}", f"{plain['std']:.1f}") + " tok/s; "  # type: ignore[index]
            f"speed-up {float(sp['speedup']):.2f}x"))  # type: ignore[arg-type]
    out.append(("repetitions", str(r.repetitions)))
    return out


@app.command()
@model_command(speculative=True)
def bench(
    tokens_per_sec: Annotated[bool, typer.Option(
        "--tokens-per-sec", show_default=False, help="Measure prefill and decode throughput (the default benchmark)")] = True,
    prompt_tokens: Annotated[str, typer.Option(
        "--prompt-tokens", "-p", metavar="N[,N...]", help="Prompt length(s) for prefill, comma-separated")] = "512",
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", help="Tokens to decode")] = 128,
    repetitions: Annotated[int, typer.Option(
        "--repetitions", "-r", help="Measured runs after the warm-up")] = 3,
    memory_read: Annotated[bool, typer.Option(
        "--memory-read", help="Also time this device's plain memory read (1 GiB, a few seconds) and show the decode's weight stream as a share of it")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --output json")] = False,
    output: Annotated[str, typer.Option(
        "--output", "-o", metavar="FORMAT", help="table, md, json or jsonl (one line per prompt length)")] = "table",
    *,
    opts: ModelOptions,
    spec: SpecOptions,
) -> None:
    """Benchmark tokens/s: pp (prefill) and tg (decode), with warm-up and compile time apart."""
    fmt = "json" if json_out else output
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"--output must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not tokens_per_sec:
        raise InvalidArgumentError("only --tokens-per-sec is available")
    lengths = parse_lengths(prompt_tokens)
    settings.check_min("--gen-tokens", gen_tokens, 1)
    settings.check_min("--repetitions", repetitions, 1)
    need = bench_context(lengths, gen_tokens)
    if opts.max_seq_len is not None and need > opts.max_seq_len:
        raise InvalidArgumentError(
            f"--prompt-tokens {max(lengths)} and --gen-tokens {gen_tokens} need a context of "
            f"{need} tokens, more than --max-seq-len {opts.max_seq_len}")
    engine = load_engine(opts, warm_up=False, spec=spec)  # run_bench times the warm-up itself
    with console.progress("benchmark") as update:
        def progress(step: BenchStep) -> None:
            if update is not None:
                update(step_text(step), step.index - 1, step.total)

        result = run_bench(engine, prompt_tokens=lengths, gen_tokens=gen_tokens,
                           repetitions=repetitions, memory_read=memory_read, progress=progress)
    render(result, fmt)


def step_text(step: BenchStep) -> str:
    """`warm-up (and compile): pp512`, `repetition 2 of 3: tg128`, `memory read`."""
    if step.name == "memory read":
        return step.name
    if step.repetition == 0:
        return f"warm-up{' (and compile)' if step.index == 1 else ''}: {step.name}"
    return f"repetition {step.repetition} of {step.repetitions}: {step.name}"


def render(r: BenchResult, fmt: str) -> None:
    """Print the result in the chosen format."""
    if fmt == "json":
        console.write(json.dumps(r.to_dict()) + "\n")
    elif fmt == "jsonl":
        data = r.to_dict()
        prefill = data.pop("prefill")
        assert isinstance(prefill, (list, tuple))
        for p in prefill:
            console.write(json.dumps({**data, "prefill": p}) + "\n")
    elif fmt == "md":
        lines = ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows(r)]
        console.write("\n".join(lines) + "\n")
    else:
        console.print_rows(rows(r), title="llamarun bench")
