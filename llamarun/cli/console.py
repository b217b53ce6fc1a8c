"""Consoles, logging setup and small output helpers for the CLI (the only place rich is used)."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

# Both follow sys.stdout/sys.stderr at print time, so test runners that swap them still work.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


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


def note(message: str, *, style: str = "dim") -> None:
    """One informational line on stderr."""
    err.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One `error: ...` line on stderr (never wrapped, never parsed as markup)."""
    err.print("[bold red]error:[/] ", end="", soft_wrap=True)
    err.print(message, markup=False, highlight=False, soft_wrap=True)
