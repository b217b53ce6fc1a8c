"""`llamarun chat`: an interactive conversation (or one message per line when stdin is piped)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamarun.cli import app, console, settings
from llamarun.cli.common import (
    CompileOpt, DeviceOpt, DtypeOpt, GroupSizeOpt, MaxSeqLenOpt, MaxTokensOpt, MinPOpt, ModelOpt,
    ModelOptions, QuantizeOpt, RepeatPenaltyOpt, SeedOpt, StopOpt, TemperatureOpt, TopKOpt,
    TopPOpt, VerboseOpt, check_model_options, cli_errors, load_engine, model_sampling,
    stdin_replacing, utf8_text,
)
from llamarun.cli.repl import Repl, resumed_note
from llamarun.errors import InvalidArgumentError
from llamarun.saved_chat import SavedChat, load_chat

DEFAULT_MAX_TOKENS = 512
CHAT_PANEL = "Conversation"


def check_save_path(path: Path | None) -> None:
    """--save needs a writable place: a file (new or not) in an existing folder."""
    if path is None:
        return
    if path.is_dir():
        raise InvalidArgumentError(f"--save must be a file, got the folder {str(path)!r}")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"--save must be a file in an existing folder, got {str(path)!r}")


@app.command()
def chat(
    system: Annotated[Optional[str], typer.Option(
        "--system", metavar="TEXT", show_default=False, rich_help_panel=CHAT_PANEL,
        help="System prompt (replaces a loaded conversation's)")] = None,
    save: Annotated[Optional[Path], typer.Option(
        "--save", metavar="FILE", show_default=False, rich_help_panel=CHAT_PANEL,
        help="Save the conversation to FILE (JSON) after every reply, atomically")] = None,
    load: Annotated[Optional[Path], typer.Option(
        "--load", metavar="FILE", show_default=False, rich_help_panel=CHAT_PANEL,
        help="Resume a conversation saved with --save or /save (its settings too, unless "
             "flags override them)")] = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto",
    group_size: GroupSizeOpt = 32,
    max_seq_len: MaxSeqLenOpt = None,
    compile: CompileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Chat with the model in its chat format; history stays in the KV cache.

    With stdin not a terminal, each input line is one user message and replies are printed plainly.
    Sampling defaults: a loaded conversation's settings, else the model's generation_config.json,
    else llamarun's; flags override them.
    """
    console.setup_logging(verbose)
    with cli_errors(verbose):
        flags = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repeat_penalty": repeat_penalty, "seed": seed, "max_tokens": max_tokens}
        settings.check_flags(flags)
        opts = ModelOptions(model, device, dtype, max_seq_len, compile, verbose, quantize, group_size)
        check_model_options(opts)
        check_save_path(save)
        saved: SavedChat | None = load_chat(load) if load is not None else None
        engine = load_engine(opts)
        params, _ = model_sampling(engine, flags, base=saved.sampling if saved else None)
        interactive = sys.stdin.isatty()
        stdin_replacing()  # invalid UTF-8 typed or piped in becomes U+FFFD
        if system is not None:
            system = utf8_text(system, "--system")
        stop = [utf8_text(s, "--stop") for s in stop or ()]
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        label = model or str(engine.checkpoint.path)
        repl = Repl(engine.chat(system=system), params, max_tokens=DEFAULT_MAX_TOKENS,
                    stop=stop or [], interactive=interactive, model=label,
                    save_path=save or load, autosave=save is not None)
        if saved is not None and load is not None:
            repl.resume(saved)
            repl.params = params  # the saved settings with the flags applied
            if system is not None:
                repl.session.set_system(system)
            console.note(resumed_note(saved, load, label))
        if max_tokens is not None:
            repl.max_tokens = max_tokens
        repl.run()
        if save is not None:
            repl.save(str(save), quiet=True)
        if repl.failures and not interactive:
            # A script piping messages in must learn that one of them got no reply.
            raise typer.Exit(1)
