"""`llamarun serve`: the OpenAI-compatible HTTP server (see llamarun.server)."""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llamarun.cli import app, console
from llamarun.cli.common import cli_errors, load_engine, model_sampling
from llamarun.cli.options import ModelOptions, SpecOptions, model_command
from llamarun.errors import InvalidArgumentError

if TYPE_CHECKING:
    from llamarun.engine import Engine

# scheduler.DEFAULT_PREFILL_CHUNK, written out: importing the scheduler imports torch, which the
# CLI does only once a command runs (a test checks they agree).
PREFILL_CHUNK_SHOWN = "8"


@app.command()
@model_command(speculative=True)
def serve(
    host: Annotated[str, typer.Option(
        "--host", metavar="ADDR", help="Address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="N", help="TCP port")] = 8000,
    max_concurrency: Annotated[int, typer.Option(
        "--max-concurrency", metavar="N",
        help="Requests decoded together (KV cache slots of --max-seq-len tokens each)")] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", metavar="N", help="Requests that may wait for a slot before 429")] = 64,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", metavar="KEY", envvar="LLAMARUN_API_KEY", show_default=False,
        help="Require `Authorization: Bearer KEY` on /v1 (default: $LLAMARUN_API_KEY, else "
             "no key)")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No log line per request on stderr")] = False,
    prefill_chunk: Annotated[Optional[int], typer.Option(
        "--prefill-chunk", metavar="N", show_default=False,
        help="Prompt tokens prefilled per step while other requests generate, inside their "
             "decode pass (chunked prefill: a long prompt slows their next tokens by a chunk, "
             "instead of stopping them for the whole prompt; larger: faster prompts, slower "
             f"streams meanwhile; default {PREFILL_CHUNK_SHOWN})")] = None,
    *,
    opts: ModelOptions,  # the model flags, checked already (options.model_command)
    spec: SpecOptions,
) -> None:
    """Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models).

    Concurrent requests are decoded together in one batch (continuous batching); a request's
    greedy output does not depend on the others. Ctrl-C lets running requests finish, then exits.
    """
    from llamarun.server import (
        check_api_key, create_app, is_loopback, listen, make_server, refuse_requests,
    )

    with cli_errors(opts.verbose):
        if not 0 <= port <= 65535:
            raise InvalidArgumentError(f"--port must be in 0..65535, got {port}")
        if max_concurrency < 1:
            raise InvalidArgumentError(f"--max-concurrency must be at least 1, got {max_concurrency}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InvalidArgumentError(f"--prefill-chunk must be at least 1, got {prefill_chunk}")
        if max_queue < 0:
            raise InvalidArgumentError(f"--max-queue must be at least 0, got {max_queue}")
        if api_key is not None:
            check_api_key(api_key)  # printable ASCII: what clients can send in a header
        _log_requests(not quiet)
        from llamarun.cli.distributed import joined

        # Tensor parallelism: rank 0 serves and sends each forward pass to the other ranks,
        # which run them with it (parallel.LeaderRunner / follow).
        control = None
        if joined():
            from llamarun.parallel import control_group

            control = control_group()
        if console.rank == 0:
            sock = listen(host, port)  # before loading: a port in use is a quick, clear error
            if not is_loopback(host) and api_key is None:
                console.note(f"warning: listening on {host} without --api-key: anyone who can "
                             "reach this port can use the model", style="yellow")
        engine = load_engine(opts, slots=max_concurrency, background=True, spec=spec)
        if prefill_chunk is not None:
            engine.scheduler.prefill_chunk = prefill_chunk
        defaults, _ = model_sampling(engine, {})  # generation_config.json's, else llamarun's
        if control is not None and console.rank != 0:
            from llamarun.parallel import follow

            signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop
            follow(engine.runner, control)  # a lost rank 0 raises here: cli.main says so
            return
        model_id = engine.checkpoint.path.name
        application = create_app(engine, model_id=model_id, api_key=api_key, max_queue=max_queue,
                                 sampling=defaults)
        server = make_server(application)
        leader = None
        if control is not None:
            from llamarun.parallel import LeaderRunner, PeerLost

            def lost(e: PeerLost) -> None:  # in the scheduler's thread, at the failed pass
                refuse_requests(application, str(e))
                server.should_exit = True  # running requests end with e (503), then it stops

            leader = LeaderRunner(engine.runner, control, on_lost=lost)
            engine.scheduler.runner = leader
            if not opts.verbose:  # the rank says what happened in one line, not a traceback
                logging.getLogger("llamarun.scheduler").addFilter(_not_peer_lost)
        shown = f"[{host}]" if ":" in host else host
        port = sock.getsockname()[1]
        console.note(f"serving {model_id} at http://{shown}:{port}/v1 ({max_concurrency} slots of "
                     f"{engine.max_seq_len} tokens; compiled decode step: {_compiled(engine)}); "
                     "Ctrl-C to stop")
        # uvicorn handles Ctrl-C and SIGTERM itself (running requests finish), then raises the
        # signal again for whoever embeds it: here that ends quietly instead of in a traceback.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
        if leader is not None:
            if leader.lost is not None:
                # The collective's own error, as a command's would be: cli.main ends the rank
                # with one line (none under --tp, whose launcher names the rank that died).
                raise leader.lost
            leader.close()
        console.note("server stopped")


def _compiled(engine: Engine) -> str:
    state = engine.compile_state
    if state == "ready":  # it takes over at the first request
        return "in use"
    if state == "compiling":
        return "compiling in the background (eager until it is ready; GET /health tells)"
    return state


def _not_peer_lost(record: logging.LogRecord) -> bool:
    """Drops the scheduler's traceback for a pass that failed because a rank went away."""
    from llamarun.parallel import PeerLost

    return not (record.exc_info and isinstance(record.exc_info[1], PeerLost))


class _RequestLine(logging.Handler):
    """Writes the server's line per request (llamarun.access) to stderr as it is."""

    def emit(self, record: logging.LogRecord) -> None:
        console.note(self.format(record), style="")


def _log_requests(on: bool) -> None:
    access = logging.getLogger("llamarun.access")
    access.handlers.clear()
    access.propagate = False  # not through the `llamarun` handler's level and columns
    access.setLevel(logging.INFO if on else logging.WARNING)
    handler = _RequestLine()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    access.addHandler(handler)
