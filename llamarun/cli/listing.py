"""`llamarun list`: every model llamarun can find, with format, size, parameters and context."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from llamarun.cli import app, console
from llamarun.cli.common import cli_errors
from llamarun.cli.options import VerboseOpt
from llamarun.hf_cache import hub_cache_dir
from llamarun.models_list import ModelEntry, find_models

COLUMNS = ("model", "source", "format", "size", "params", "context")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def row(e: ModelEntry) -> tuple[str, ...]:
    """The text columns of one model."""
    return (e.name, e.source, e.layout or "?", _size(e.size_bytes), _params(e.n_params),
            "-" if e.context is None else str(e.context))


def table_lines(entries: list[ModelEntry]) -> list[str]:
    """Aligned columns with a header; never wrapped, no trailing spaces; problems on their own line."""
    rows = [COLUMNS, *(row(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for r, e in zip(rows, [None, *entries]):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if e is not None and e.error:
            lines.append(f"  ! {e.error}")
    return lines


@app.command("list")
def list_models(
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print a JSON list, one object per model")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """List the models llamarun can find: ./checkpoints, $LLAMARUN_MODEL, the Hugging Face cache
    ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub) and the embedded default.

    The MODEL column is what to pass to --model.
    """
    console.setup_logging(verbose)
    with cli_errors(verbose):
        entries = find_models(env=os.environ, cwd=Path.cwd())
        if json_out:
            console.write(json.dumps([e.to_dict() for e in entries]) + "\n")
            return
        if not entries:
            console.note(f"no models found (looked in ./checkpoints, $LLAMARUN_MODEL, "
                         f"{hub_cache_dir(os.environ)} and for the embedded default model)")
            return
        console.write("\n".join(table_lines(entries)) + "\n")
