"""`llamarun perplexity`: sliding-window perplexity of the model on a text file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamarun import files
from llamarun.cli import app, console, settings
from llamarun.cli.common import load_engine, read_stdin
from llamarun.cli.options import ModelOptions, model_command
from llamarun.cli.distributed import rank0
from llamarun.errors import InvalidArgumentError
from llamarun.perplexity import PerplexityResult, default_text, perplexity

DEFAULT_CTX = 512


def read_text(file: str | None) -> str:
    """The text of FILE, stdin for `-`, or the built-in default text when omitted."""
    if file is None:
        return default_text()
    if file == "-":
        return read_stdin()
    return files.read_text(Path(file), what="text file", error=InvalidArgumentError,
                           limit=files.MAX_TEXT_BYTES)


def summary(r: PerplexityResult) -> str:
    """`perplexity 12.345  (N tokens in W windows of ctx C, stride S; T tok/s)`."""
    windows = "window" if r.n_windows == 1 else "windows"
    return (f"perplexity {r.perplexity:.3f}  ({r.n_tokens_scored} tokens in {r.n_windows} "
            f"{windows} of ctx {r.ctx}, stride {r.stride}; {r.tokens_per_s:.1f} tok/s)")


@app.command(name="perplexity")
@model_command(compile=False)
def perplexity_cmd(
    file: Annotated[Optional[str], typer.Argument(
        metavar="FILE|-", show_default=False,
        help="UTF-8 text file; `-` reads stdin (default: the Python docs' pydoc topics)")] = None,
    ctx: Annotated[Optional[int], typer.Option(
        "--ctx", show_default=False,
        help=f"Tokens per window (default {DEFAULT_CTX}; at most the KV cache length)")] = None,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", show_default=False,
        help="Tokens between window starts (default: ctx / 2)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", "-n", show_default=False,
        help="Use only the first N tokens of the text (default: all)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    *,
    opts: ModelOptions,
) -> None:
    """Perplexity of the model on a text, scored in overlapping windows of --ctx tokens."""
    settings.check_min("--ctx", ctx, 2)
    settings.check_min("--stride", stride, 1)
    settings.check_min("--max-tokens", max_tokens, 2)
    text = rank0(lambda: read_text(file))  # a tensor-parallel job: rank 0 reads
    engine = load_engine(opts)
    window = min(ctx or DEFAULT_CTX, engine.max_seq_len)
    if stride is not None and stride > window:
        raise InvalidArgumentError(f"--stride must be at most the window ({window}), got {stride}")
    if ctx is not None and ctx > window:
        console.note(f"--ctx {ctx} exceeds the KV cache of {window} tokens: using {window} "
                     "(raise --max-seq-len for longer windows)")
    ids = engine.tokenizer.encode(text, bos=engine.tokenizer.add_bos)
    if len(ids) < 2:
        raise InvalidArgumentError(
            f"the text has {len(ids)} tokens: perplexity needs at least 2")
    with console.progress("perplexity") as update:
        def progress(done: int, total: int) -> None:
            if update is not None:
                update("(tokens)", done, total)

        result = perplexity(engine, ids, ctx=window, stride=stride, max_tokens=max_tokens,
                            progress=progress)
    if json_out:
        data = {**dataclasses.asdict(result), "model": str(engine.checkpoint.path),
                "dtype": str(engine.dtype).removeprefix("torch.")}
        console.write(json.dumps(data) + "\n")
    else:
        console.write(summary(result) + "\n")
