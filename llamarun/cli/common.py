"""Options shared by every command, model loading with a progress bar, and error mapping."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamarun.cli import console
from llamarun.engine import Engine
from llamarun.errors import InvalidArgumentError, LlamarunError
from llamarun.loaders import check_quantize
from llamarun.resolve import ENV_VAR, resolve_model
from llamarun.sampling import SamplingParams

_DEFAULTS = SamplingParams()
COMPILE_ENV_VAR = "LLAMARUN_COMPILE"
MODEL_PANEL = "Model"
SAMPLING_PANEL = "Sampling"

ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", show_default=False, rich_help_panel=MODEL_PANEL,
    help=f"Meta or HF checkpoint folder, or a GGUF file (default: ${ENV_VAR}, else the single "
         "checkpoint under ./checkpoints/, else the embedded default model)")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", rich_help_panel=MODEL_PANEL, help="auto, cpu, cuda or cuda:N")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", rich_help_panel=MODEL_PANEL,
    help="auto, float32, bfloat16 or float16. auto: bfloat16 on CUDA and on CPUs with native "
         "bf16, else float32 (16-bit checkpoints stay 16-bit)")]
QuantizeOpt = Annotated[str, typer.Option(
    "--quantize", rich_help_panel=MODEL_PANEL,
    help="Weight storage: auto (keep a GGUF's quantized tensors quantized, dense ones dense), "
         "none (dequantize everything into --dtype), int8 (per channel) or int4 (groupwise)")]
GroupSizeOpt = Annotated[int, typer.Option(
    "--group-size", rich_help_panel=MODEL_PANEL, help="int4 group size: 32, 64 or 128")]
MaxSeqLenOpt = Annotated[Optional[int], typer.Option(
    "--max-seq-len", show_default=False, rich_help_panel=MODEL_PANEL,
    help="KV cache length in tokens (default: the model's context, at most 4096)")]
CompileOpt = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", envvar=COMPILE_ENV_VAR, show_default=False,
    rich_help_panel=MODEL_PANEL,
    help="torch.compile the decode step. Default: on CPU, compile in the background while "
         "replies start at once, and switch when ready (cached for later runs); --compile: "
         "compile before the first reply (CUDA graphs on CUDA); --no-compile: never")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Debug logging, and tracebacks on errors")]

MaxTokensOpt = Annotated[int, typer.Option(
    "--max-tokens", "-n", rich_help_panel=SAMPLING_PANEL, help="Most tokens to generate")]
TemperatureOpt = Annotated[float, typer.Option(
    "--temperature", "-t", rich_help_panel=SAMPLING_PANEL, help="0 = greedy (deterministic)")]
TopKOpt = Annotated[int, typer.Option(
    "--top-k", rich_help_panel=SAMPLING_PANEL, help="Keep the k most likely tokens (0 = off)")]
TopPOpt = Annotated[float, typer.Option(
    "--top-p", rich_help_panel=SAMPLING_PANEL,
    help="Keep the most likely tokens up to this probability mass (1 = off)")]
MinPOpt = Annotated[float, typer.Option(
    "--min-p", rich_help_panel=SAMPLING_PANEL,
    help="Drop tokens less likely than this fraction of the top token (0 = off)")]
RepeatPenaltyOpt = Annotated[float, typer.Option(
    "--repeat-penalty", rich_help_panel=SAMPLING_PANEL,
    help=f"Penalise tokens seen in the last {_DEFAULTS.repeat_last_n} (1 = off)")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", "-s", show_default=False, rich_help_panel=SAMPLING_PANEL,
    help="Seed for a reproducible sampled output")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", show_default=False, rich_help_panel=SAMPLING_PANEL,
    help="Stop when this text appears (not printed); repeatable")]


@dataclass(frozen=True)
class ModelOptions:
    """The model flags every command takes."""

    model: Path | None
    device: str = "auto"
    dtype: str = "auto"
    max_seq_len: int | None = None
    compile: bool | None = None  # None: in the background where that works, else not
    verbose: bool = False
    quantize: str = "auto"
    group_size: int = 32


def sampling_params(*, temperature: float, top_k: int, top_p: float, min_p: float,
                    repeat_penalty: float, seed: int | None) -> SamplingParams:
    """Build (and validate) SamplingParams from the flags."""
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed)


def check_max_tokens(n: int) -> None:
    """--max-tokens must be positive."""
    if n < 1:
        raise InvalidArgumentError(f"--max-tokens must be at least 1, got {n}")


def load_engine(opts: ModelOptions, *, warm_up: bool = True) -> Engine:
    """Resolve the model (flag, environment, ./checkpoints, default) and load it.

    With --compile the decode step is compiled here (unless warm_up is False), with a note,
    rather than as a long pause in the middle of the first reply. By default it is compiled in
    a background thread where the device allows it (replies run eagerly until it is ready).
    """
    engine = _load(opts)
    if opts.compile and warm_up:
        console.note("compiling the decode step (about a minute the first time, "
                     "seconds once cached)...")
        engine.warmup()
    elif opts.compile is None and warm_up:
        engine.compile_in_background()
    return engine


def _load(opts: ModelOptions) -> Engine:
    if opts.max_seq_len is not None and opts.max_seq_len < 2:
        raise InvalidArgumentError(f"--max-seq-len must be at least 2, got {opts.max_seq_len}")
    check_quantize(opts.quantize, opts.group_size)
    resolved = resolve_model(opts.model, env=os.environ, cwd=Path.cwd())
    if resolved.source == "default":
        console.note(f"using the embedded default model {resolved.path} (choose another with --model)")

    def load(progress: Callable[[int, int], None] | None = None) -> Engine:
        return Engine.load(resolved.path, device=opts.device, dtype=opts.dtype,
                           max_seq_len=opts.max_seq_len, compile=opts.compile is not False,
                           quantize=opts.quantize, group_size=opts.group_size, progress=progress)

    if not console.err.is_terminal:
        return load()
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("loading {task.description}"), BarColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console.err, transient=True) as bar:
        task = bar.add_task(f"{resolved.path.parent.name}/{resolved.path.name}", total=None)
        return load(lambda done, total: bar.update(task, completed=done, total=total))


@contextmanager
def cli_errors(verbose: bool) -> Iterator[None]:
    """Turn user errors into one `error:` line and exit 1; end quietly on a closed stdout or Ctrl-C."""
    try:
        yield
    except LlamarunError as e:
        if verbose:
            raise
        console.error(str(e))
        raise typer.Exit(1) from None
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        console.err.print()
        raise typer.Exit(130) from None
    except OSError as e:  # unreadable files the loaders did not wrap
        if verbose:
            raise
        where = f"{e.filename}: " if e.filename else ""
        console.error(f"{where}{e.strerror or e}")
        raise typer.Exit(1) from None


def _silence_stdout() -> None:
    # The reader went away (`| head`): point stdout at /dev/null so the interpreter's final
    # flush does not fail again with "Exception ignored ... BrokenPipeError".
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (test runners)
        pass
