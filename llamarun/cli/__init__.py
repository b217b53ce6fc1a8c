"""The `llamarun` command line: a thin Typer layer over the library API."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

from llamarun.cli.help import Group, unknown_option_message
from llamarun.errors import clean_message

app = typer.Typer(
    cls=Group,
    name="llamarun",
    help="Run Meta Llama checkpoints (Meta, Hugging Face and GGUF) on CPU or CUDA.\n\n"
         "Every command finds its model the same way: --model PATH (or a Hugging Face repo id in the "
         "local cache), else $LLAMARUN_MODEL, else the "
         "single checkpoint under ./checkpoints/, else the embedded default model.\n\n"
         "--tp N before or after the command runs it split across N processes of this host "
         "(tensor parallelism; torchrun -m llamarun ... for several hosts).",
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
    tp: Annotated[Optional[int], typer.Option(
        "--tp", metavar="N", show_default=False,
        help="Run the command split across N processes of this host (tensor parallelism; "
             "before or after the command; default 1: this process alone)")] = None,
) -> None:
    """Global options (the help text is the app's)."""
    if tp not in (None, 1):
        # `llamarun` takes --tp out of the arguments before Typer sees them (cli.main); only a
        # caller that runs `app` itself gets here.
        raise typer.BadParameter("--tp works through the llamarun command (llamarun.cli.main)")


def _register() -> None:
    # Each command lives in its own module; importing registers it on `app`.
    from llamarun.cli import (  # noqa: F401
        bench, chat, complete, info, listing, perplexity, serve, tokenize,
    )


try:
    # Ctrl-C while torch is still being imported: the import runs with SIGINT held back (one
    # landing inside torch's C++ import code aborts the process with "terminate called ..."),
    # and a Ctrl-C that came meanwhile is taken when the import is over, with no traceback.
    _mask = getattr(signal, "pthread_sigmask", None)
    if _mask is not None:
        _mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        _register()
    finally:
        if _mask is not None:
            _mask(signal.SIG_UNBLOCK, {signal.SIGINT})
except KeyboardInterrupt:
    sys.stderr.write("\n")
    raise SystemExit(130) from None


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


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so that no `except Exception` swallows it)."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def _standard_streams() -> bool:
    """Whether stdout is open. A closed stdout or stderr (`>&-`) leaves Python with None there:
    both file descriptors are pointed at /dev/null (so no file opened later takes their number)
    and stderr is replaced, so that errors can still be reported."""
    ok = sys.stdout is not None
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
                setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115
            except OSError:
                pass
    return ok


def _quiet_stdout() -> None:
    # The reader went away (`| head`): point stdout at /dev/null so the interpreter's final
    # flush does not fail again with "Exception ignored ... BrokenPipeError".
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (test runners)
        pass


def _stdout_identity() -> tuple[int, int] | None:
    try:
        st = os.fstat(1)
        return st.st_dev, st.st_ino
    except OSError:
        return None


def _stdout_reader_gone(started_as: tuple[int, int] | None) -> bool:
    """Whether stdout is a pipe whose reader has closed it: poll reports an error on it, or a
    library (rich does, on EPIPE) has already pointed it at /dev/null."""
    try:
        import select

        poller = select.poll()
        poller.register(1, select.POLLOUT)
        if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0)):
            return True
        null = os.stat(os.devnull)
        now = _stdout_identity()
        return now != started_as and now == (null.st_dev, null.st_ino)
    except (OSError, ValueError, AttributeError):
        return False


def _exit(code: int) -> None:
    from llamarun.cli import distributed

    # Skip the interpreter's teardown where it would do harm: a tensor-parallel rank (gloo's
    # threads can abort the process in it, "terminate called ..."; the rank leaves its group
    # first), or a background compile still running (its threads and compiler processes would
    # be torn down under it).
    if distributed.joined():
        distributed.leave()
    elif not any(t.name == "llamarun-compile" and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    """Console-script entry point: usage errors are one `error:` line, exit status 2.

    Whatever the command: a closed pipe on stdout ends quietly with status 0, Ctrl-C with 130,
    SIGTERM with one line and 143 (128 + 15), a closed stdout (`>&-`) with one line and 1.
    """
    if not _standard_streams():
        sys.stderr.write("error: standard output is closed; nothing could be printed\n")
        sys.exit(1)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        _guarded()
    except Terminated:
        # Also where SIGTERM came while another ending was under way (a rank that lost its peer
        # is told to stop by the launcher as it leaves its group): that ending stops here, and
        # the exit status is SIGTERM's, which the launcher knows to be a follower's.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping
        from llamarun.cli import distributed

        if not distributed.stopped_by_launcher():
            sys.stderr.write("error: terminated (SIGTERM)\n")
        _exit(128 + signal.SIGTERM)


def _guarded() -> None:
    try:
        _main()
    except BrokenPipeError:
        _quiet_stdout()
        _exit(0)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        _exit(130)
    except Exception as e:
        from llamarun.cli import distributed

        # A collective failed because another rank went away: one line (or none, when the
        # --tp launcher names the rank that failed), never gloo's traceback.
        if not distributed.joined() or not distributed.is_peer_failure(e):
            raise
        distributed.peer_lost(e)
        _exit(distributed.PEER_LOST)


def _main() -> None:
    if not sys.argv[1:]:
        app()  # prints the help
        return
    from llamarun.cli import distributed

    tp, args = distributed.take_tp_flag(sys.argv[1:])
    if tp is not None:
        # `--tp N`: the command checks its flags and N (against the model and this machine)
        # as usual, then stops with LaunchRanks, and N ranks of this host run it.
        distributed.plan(tp)
    else:
        distributed.join_job()  # a rank of a torchrun job: join its process group first
    command = typer.main.get_command(app)
    stdout_was = _stdout_identity()
    try:
        rv = command.main(args=args, prog_name="llamarun", standalone_mode=False)
    except distributed.LaunchRanks:
        sys.exit(distributed.launch(tp or 1, args))
    except SystemExit as e:
        # Click and rich end a command whose stdout pipe closed (EPIPE) with status 1 by
        # themselves; every command ends the same way on a closed pipe: quietly, with 0.
        if e.code not in (0, None) and _stdout_reader_gone(stdout_was):
            _quiet_stdout()
            _exit(0)
        raise
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # bad flag values, unknown options or commands
        message = _number_message(e) or unknown_option_message(e) or (
            e.format_message() if hasattr(e, "format_message") else str(e))
        sys.stderr.write(f"error: {clean_message(' '.join(message.split()))}\n")
        _exit(getattr(e, "exit_code", 2))
    _exit(rv if isinstance(rv, int) else 0)
