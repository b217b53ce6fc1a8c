"""Consoles, logging setup and small output helpers for the CLI (the only place rich is used)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler

from llamarun.errors import clean_message

# Both follow sys.stdout/sys.stderr at print time, so test runners that swap them still work.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
# In a tensor-parallel job, ranks other than 0 print nothing but their own errors (named).
rank: int = 0


def set_rank(r: int) -> None:
    """Make this process rank `r` of a job: from rank 1 on, stdout and notes go nowhere."""
    global rank
    rank = r
    if r != 0:
        import os

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def setup_logging(verbose: bool) -> None:
    """Send llamarun's log records to stderr: DEBUG with --verbose, else warnings only."""
    logger = logging.getLogger("llamarun")
    logger.handlers.clear()
    handler = RichHandler(console=err, show_path=False, markup=False, rich_tracebacks=False)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False


def write(text: str) -> None:
    """Write model text to stdout as it is (no markup, no wrapping) and flush it."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_rows(rows: list[tuple[str, str]], *, title: str | None = None) -> None:
    """Key/value rows: an aligned table on a terminal; plain `key: value` lines when piped.

    Piped output is never wrapped or padded, so `| grep` and `| cut` see whole values.
    """
    if not out.is_terminal:
        write("".join(f"{k}: {v}".rstrip() + "\n" for k, v in rows))
        return
    from rich.table import Table

    if title is None:  # a bare two-column list
        table = Table(show_header=False, box=None, pad_edge=False)
    else:
        table = Table(title=title, show_header=True)
    table.add_column("metric", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    out.print(table, markup=False, highlight=False)


@contextmanager
def progress(what: str) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress display on stderr when it is a terminal, else nothing (the callback is None).

    The callback takes (text, done, total): the step under way, steps done, steps in all.
    """
    if not err.is_terminal or rank != 0:
        yield None
        return
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn(f"{what} {{task.description}}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(text: str, done: int, total: int) -> None:
            bar.update(task, description=text, completed=done, total=total)
            bar.refresh()  # show each step at once, not at the next 10 Hz tick

        yield update


def note(message: str, *, style: str = "dim") -> None:
    """One informational line on stderr."""
    if rank != 0:
        return
    err.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One `error: ...` line on stderr (never wrapped, never parsed as markup)."""
    if rank != 0:
        message = f"(rank {rank}) {message}"
    err.print("[bold red]error:[/] ", end="", soft_wrap=True)
    # One line, and no escape sequences from file names, metadata or library messages.
    err.print(" ".join(clean_message(message).splitlines()), markup=False, highlight=False,
              soft_wrap=True)
