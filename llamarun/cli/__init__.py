"""The `llamarun` command line: a thin Typer layer over the library API."""

from __future__ import annotations

import os
import sys
import threading
from typing import Annotated

import typer

from llamarun.cli.help import Group

app = typer.Typer(
    cls=Group,
    name="llamarun",
    help="Run Meta Llama checkpoints (Meta, Hugging Face and GGUF) on CPU or CUDA.\n\n"
         "Every command finds its model the same way: --model PATH (or a Hugging Face repo id in the "
         "local cache), else $LLAMARUN_MODEL, else the "
         "single checkpoint under ./checkpoints/, else the embedded default model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from llamarun import __version__

        typer.echo(f"llamarun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit")] = False,
) -> None:
    """Global options (the help text is the app's)."""


def _register() -> None:
    # Each command lives in its own module; importing registers it on `app`.
    from llamarun.cli import (  # noqa: F401
        bench, chat, complete, info, listing, perplexity, serve, tokenize,
    )


_register()


def _number_message(e: Exception) -> str | None:
    """`--max-tokens must be an integer, got 'abc'` for a flag given a non-number (the flag as
    typed, in the style of every other value error), or None for other usage errors."""
    param = getattr(e, "param", None)
    opts = getattr(param, "opts", None)
    errors = getattr(e.__cause__, "errors", None)  # Typer checks values with pydantic
    if not isinstance(e, typer.BadParameter) or not opts or not callable(errors):
        return None
    try:
        first = errors()[0]
    except (IndexError, TypeError, ValueError):
        return None
    kinds = {"int_parsing": "an integer", "int_from_float": "an integer",
             "float_parsing": "a number"}
    kind = kinds.get(first.get("type", ""))
    if kind is None:
        return None
    flag = next((o for o in opts if o.startswith("--")), opts[0])
    return f"{flag} must be {kind}, got {first.get('input')!r}"


def main() -> None:
    """Console-script entry point: usage errors are one `error:` line, exit status 2."""
    if not sys.argv[1:]:
        app()  # prints the help
        return
    from llamarun.cli import distributed

    tp, args = distributed.take_tp_flag(sys.argv[1:])
    if tp is not None:  # `--tp N`: run this command on N ranks of this host
        sys.exit(distributed.launch(tp, args))
    distributed.join_job()  # a rank of a torchrun job: join its process group first
    command = typer.main.get_command(app)
    try:
        rv = command.main(prog_name="llamarun", standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # bad flag values, unknown options or commands
        message = _number_message(e) or (
            e.format_message() if hasattr(e, "format_message") else str(e))
        sys.stderr.write(f"error: {' '.join(message.split())}\n")
        sys.exit(getattr(e, "exit_code", 2))
    code = rv if isinstance(rv, int) else 0
    if any(t.name == "llamarun-compile" and t.is_alive() for t in threading.enumerate()):
        # A background compile is still running: do not wait for it, and do not let interpreter
        # shutdown tear down its threads and compiler processes under it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
