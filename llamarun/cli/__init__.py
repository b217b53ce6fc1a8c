"""The `llamarun` command line: a thin Typer layer over the library API."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="llamarun",
    help="Run Meta Llama checkpoints (Meta, Hugging Face and GGUF) on CPU or CUDA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each command lives in its own module; importing registers it on `app`.
    from llamarun.cli import tokenize  # noqa: F401


_register()


def main() -> None:
    """Console-script entry point."""
    app()
