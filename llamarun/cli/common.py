"""Model loading with a progress bar, and error mapping (the shared flags are in options.py)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import typer

from llamarun.cli import console, settings
from llamarun.cli.options import (
    ModelOptions, SpecOptions, apply_threads, check_threads, default_threads,
)
from llamarun import kernels
from llamarun.device import resolve_device
from llamarun.engine import Engine
from llamarun import files
from llamarun.errors import InvalidArgumentError, LlamarunError
from llamarun.generation_config import generation_defaults
from llamarun.loaders import check_quantize
from llamarun.resolve import resolve_model
from llamarun.sampling import SamplingParams

if TYPE_CHECKING:
    from llamarun.parallel import Collectives


def model_sampling(engine: Engine, explicit: Mapping[str, object], *,
                   base: SamplingParams | None = None) -> tuple[SamplingParams, dict[str, object]]:
    """SamplingParams from `base`, the model's generation_config.json, then the flags given.

    Returns the params and the model's defaults (for a note or `info`).
    """
    # A resumed chat's own settings (base) take the place of the model's defaults.
    defaults: dict[str, object] = (
        {} if base is not None else dict(generation_defaults(engine.checkpoint.path)))
    params = settings.sampling_params(explicit, defaults=defaults, base=base)
    from llamarun.cli.distributed import shared_seed

    seed = shared_seed(params.seed)  # tensor-parallel ranks must sample alike
    if seed != params.seed:
        params = dataclasses.replace(params, seed=seed)
    return params, defaults


def check_model_options(opts: ModelOptions) -> None:
    """Check every model flag before a model is chosen, so a bad flag is the only line printed."""
    settings.check_min("--max-seq-len", opts.max_seq_len, 2)
    check_quantize(opts.quantize, opts.group_size)
    settings.check_device(opts.device)
    settings.check_dtype(opts.dtype)
    check_threads(opts.threads)
    if opts.threads is None:
        default_threads(os.environ)  # a bad $OMP_NUM_THREADS is named now, not after loading


def load_engine(opts: ModelOptions, *, warm_up: bool = True, slots: int = 1,
                background: bool = False, spec: SpecOptions | None = None) -> Engine:
    """Resolve the model (flag, environment, ./checkpoints, default) and load it.

    With --compile the decode graphs are compiled here (unless warm_up is False), with a note,
    rather than as a long pause in the middle of the first reply. By default, commands that run
    many generations (`background`: chat, serve) compile them in a background thread where that
    pays (Engine.compile_pays: not where the eager step is llamarun's fused CPU kernels), and
    they take over between generations; one-shot commands stay eager unless --compile, so that
    the same command gives the same tokens whether or not a compile finished meanwhile.
    """
    engine = _load(opts, slots)
    note = requantize_note(engine, opts.quantize)
    if note:
        console.note(note)
    if spec is not None and spec.enabled:
        speculate(engine, spec)
    if opts.compile and warm_up:
        console.note("compiling the decode step (about a minute the first time, "
                     "seconds once cached)...")
        engine.warmup()
    elif opts.compile is None and background and engine.tp is None and engine.compile_pays:
        # (Tensor-parallel ranks compile only when asked, all together: a background compile
        # would run collectives out of step with the other ranks.)
        engine.compile_in_background()
    return engine


def speculate(engine: Engine, spec: SpecOptions) -> None:
    """Set up speculative decoding as the flags ask (loading the draft model, if any)."""
    config = spec.config()
    if spec.draft_model is None:
        engine.speculate(config)
        return
    resolved = resolve_model(spec.draft_model, env=os.environ, cwd=Path.cwd())
    draft = engine.load_draft(resolved.path, config=config)
    weights = ", ".join(sorted(draft.checkpoint.format_counts()))
    console.note(f"speculative decoding: {resolved.path.name} ({weights}) drafts up to "
                 f"{config.draft_tokens} tokens a step")


def requantize_note(engine: Engine, quantize: str) -> str | None:
    """A note when --quantize int8/int4 re-quantizes matrices the file already stores quantized
    (a Q4_1 GGUF with --quantize int4 --group-size 64): they are dequantized and rounded again,
    which adds error where `auto` would have kept them as stored."""
    if quantize not in ("int8", "int4"):
        return None
    from llamarun.loaders.fuse import FLOAT_TYPES, linear_sources

    ckpt = engine.checkpoint
    stored = sorted({t for sources in linear_sources(ckpt.args).values() for s in sources
                     if (t := ckpt.raw.stored_type(s)) not in FLOAT_TYPES})
    if not stored:
        return None
    became = ", ".join(sorted(engine.checkpoint.format_counts()))
    return (f"{ckpt.path.name} is already quantized ({', '.join(stored)}): --quantize {quantize} "
            f"re-quantizes its dequantized weights ({became}), adding rounding error; "
            "--quantize auto keeps them as stored")


def _load(opts: ModelOptions, slots: int = 1) -> Engine:
    # (The flags were checked by the command, options.model_command.)
    resolved = resolve_model(opts.model, env=os.environ, cwd=Path.cwd())
    if resolved.source == "default":
        console.note(f"using the embedded default model {resolved.path} (choose another with --model)")

    tp, device = _tensor_parallel(opts.device)
    apply_threads(opts.threads)
    if kernels.build_pending() and resolve_device(device).type == "cpu":
        console.note("building llamarun's CPU kernels for this machine (once, about a minute)")

    def load(progress: Callable[[int, int], None] | None = None) -> Engine:
        return Engine.load(resolved.path, device=device, dtype=opts.dtype,
                           max_seq_len=opts.max_seq_len, compile=opts.compile is not False,
                           quantize=opts.quantize, group_size=opts.group_size, slots=slots,
                           progress=progress, tp=tp)

    if not console.err.is_terminal or console.rank != 0:
        return load()
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("loading {task.description}"), BarColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console.err, transient=True) as bar:
        label = resolved.repo_id or f"{resolved.path.parent.name}/{resolved.path.name}"
        task = bar.add_task(label, total=None)
        return load(lambda done, total: bar.update(task, completed=done, total=total))


def _tensor_parallel(device: str) -> tuple[Collectives | None, str | torch.device]:
    """In a torchrun job: this rank's collectives and device; else (None, device)."""
    from llamarun.device import resolve_device
    from llamarun.parallel import Collectives, current, rank_device

    job = current()
    if job is None:
        return None, device
    return Collectives(job.rank, job.world), rank_device(job, resolve_device(device))


def utf8_text(text: str, what: str) -> str:
    """`text` with invalid UTF-8 replaced by U+FFFD, and a note saying so.

    Python hands over undecodable bytes of argv and stdin as lone surrogates ("\\udcff"),
    which no tokenizer accepts: each such byte becomes U+FFFD, as in any text decoder's
    "replace" mode, rather than an error."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        fixed = text.encode("utf-8", "replace").decode("utf-8")
    console.note(f"{what} is not valid UTF-8: invalid bytes replaced by U+FFFD")
    return fixed


def read_stdin(what: str = "stdin") -> str:
    """All of stdin as text, invalid UTF-8 replaced by U+FFFD (with a note). More than
    files.MAX_TEXT_BYTES is refused as soon as that much has come (`< /dev/zero` never ends)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text-only stream (some test runners)
        text = sys.stdin.read(files.MAX_TEXT_BYTES + 1)
        if len(text) > files.MAX_TEXT_BYTES:
            raise InvalidArgumentError(f"{what} is longer than {files.MAX_TEXT_BYTES >> 20} MiB; "
                                       "give a shorter text")
        return utf8_text(text, what)
    data = files.read_stream(buffer, what=what, error=InvalidArgumentError)
    text = data.decode("utf-8", "replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        console.note(f"{what} is not valid UTF-8: invalid bytes replaced by U+FFFD")
    return text


def stdin_replacing() -> None:
    """Make line reads from stdin (chat) turn invalid UTF-8 into U+FFFD instead of failing."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError):
            pass


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
