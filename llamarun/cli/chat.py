"""`llamarun chat`: an interactive conversation (or one message per line when stdin is piped)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamarun.cli import app, console
from llamarun.cli.common import load_engine, model_sampling, stdin_replacing, utf8_text
from llamarun.cli.grammar import GrammarFlag, JsonObjectFlag, JsonSchemaFlag, bind, read_grammar
from llamarun.cli.options import ModelOptions, SamplingFlags, SpecOptions, model_command
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
@model_command(sampling=True, speculative=True, max_tokens=DEFAULT_MAX_TOKENS)
def chat(
    system: Annotated[Optional[str], typer.Option(
        "--system", metavar="TEXT", show_default=False, rich_help_panel=CHAT_PANEL,
        help="System prompt (replaces a loaded conversation's; default: none)")] = None,
    save: Annotated[Optional[Path], typer.Option(
        "--save", metavar="FILE", show_default=False, rich_help_panel=CHAT_PANEL,
        help="Save the conversation to FILE (JSON) after every reply, atomically "
             "(default: not saved)")] = None,
    load: Annotated[Optional[Path], typer.Option(
        "--load", metavar="FILE", show_default=False, rich_help_panel=CHAT_PANEL,
        help="Resume a conversation saved with --save or /save (its settings too, unless "
             "flags override them; default: a new conversation)")] = None,
    json_object: JsonObjectFlag = False,
    json_schema: JsonSchemaFlag = None,
    grammar: GrammarFlag = None,
    *,
    opts: ModelOptions,
    spec: SpecOptions,
    flags: SamplingFlags,
) -> None:
    """Chat with the model in its chat format; history stays in the KV cache.

    With stdin not a terminal, each input line is one user message and replies are printed plainly.
    Sampling defaults: a loaded conversation's settings, else the model's generation_config.json,
    else llamarun's; flags override them.
    """
    check_save_path(save)
    wanted = read_grammar(json_object, json_schema, grammar, stdin_taken="chat (its messages)")
    saved: SavedChat | None = load_chat(load) if load is not None else None
    engine = load_engine(opts, background=True, spec=spec)
    params, _ = model_sampling(engine, flags.given(), base=saved.sampling if saved else None)
    interactive = sys.stdin.isatty()
    stdin_replacing()  # invalid UTF-8 typed or piped in becomes U+FFFD
    if system is not None:
        system = utf8_text(system, "--system")
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    label = opts.model or str(engine.checkpoint.path)
    repl = Repl(engine.chat(system=system), params, max_tokens=DEFAULT_MAX_TOKENS,
                stop=list(flags.stop), interactive=interactive, model=str(label),
                save_path=save or load, autosave=save is not None)
    if saved is not None and load is not None:
        repl.resume(saved)
        repl.params = params  # the saved settings with the flags applied
        if system is not None:
            repl.session.set_system(system)
        console.note(resumed_note(saved, load, str(label)))
    if flags.max_tokens is not None:
        repl.max_tokens = flags.max_tokens
    repl.constraint = bind(wanted, engine.tokenizer)  # every reply matches it
    status = repl.run()
    if save is not None:
        repl.save(str(save), quiet=True)
    if repl.failures and not interactive:
        # A script piping messages in must learn that one of them got no reply.
        raise typer.Exit(1)
    if status:
        raise typer.Exit(status)
