"""`llamarun chat`: an interactive conversation (or one message per line when stdin is piped)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Annotated, Optional

import typer

from llamarun.cli import app, console
from llamarun.cli.common import (
    CompileOpt, DeviceOpt, DtypeOpt, GroupSizeOpt, MaxSeqLenOpt, MaxTokensOpt, MinPOpt, ModelOpt,
    ModelOptions, QuantizeOpt, RepeatPenaltyOpt, SeedOpt, StopOpt, TemperatureOpt, TopKOpt,
    TopPOpt, VerboseOpt, check_max_tokens, cli_errors, load_engine, sampling_params,
)
from llamarun.errors import InvalidArgumentError, LlamarunError
from llamarun.sampling import SamplingParams
from llamarun.session import ChatSession

_D = SamplingParams()
PROMPT, CONTINUATION, FENCE = ">>> ", "... ", '"""'
HELP = """commands:
  /help                 this help
  /exit                 quit (also Ctrl-D)
  /clear                start a new conversation
  /system TEXT          set the system prompt (empty TEXT removes it)
  /set NAME VALUE       change a setting: temperature, top_k, top_p, min_p, repeat_penalty,
                        seed (or 'none'), max_tokens
  /stats                speed of the last reply and context use
  \"\"\"                   start or end a multi-line message
Ctrl-C stops a reply; at the prompt it exits."""

_SETTINGS: dict[str, Callable[[str], object]] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
    "seed": lambda v: None if v.lower() == "none" else int(v), "max_tokens": int,
}


class Repl:
    """Reads messages and commands, streams replies."""

    def __init__(self, session: ChatSession, params: SamplingParams, *, max_tokens: int,
                 stop: list[str], interactive: bool) -> None:
        self.session = session
        self.params = params
        self.max_tokens = max_tokens
        self.stop = stop
        self.interactive = interactive

    def read_line(self, prompt: str) -> str:
        """One input line (EOFError at the end)."""
        if self.interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def read_message(self) -> str:
        """A line, or the lines between two \"\"\" fences."""
        line = self.read_line(PROMPT)
        if not line.lstrip().startswith(FENCE):
            return line
        rest = line.lstrip()[len(FENCE):]
        if rest.rstrip().endswith(FENCE):
            return rest.rstrip()[:-len(FENCE)]
        lines = [rest] if rest else []
        while True:
            line = self.read_line(CONTINUATION)
            if line.rstrip().endswith(FENCE):
                tail = line.rstrip()[:-len(FENCE)]
                if tail:
                    lines.append(tail)
                return "\n".join(lines)
            lines.append(line)

    def run(self) -> None:
        """Loop until /exit, end of input or Ctrl-C at the prompt."""
        if self.interactive:
            console.note(f"chat format {self.session.engine.chat_format.name}, context "
                         f"{self.session.engine.max_seq_len} tokens; /help for commands")
        while True:
            try:
                text = self.read_message()
            except (EOFError, KeyboardInterrupt):
                if self.interactive:
                    console.err.print()
                return
            if text.startswith("/"):
                if self.command(text) is False:
                    return
            elif text.strip():
                self.reply(text)

    def reply(self, text: str) -> None:
        """Send one message and stream the reply."""
        try:
            gen = self.session.send(text, sampling=self.params, max_new_tokens=self.max_tokens,
                                    stop=self.stop)
        except LlamarunError as e:
            console.error(str(e))
            return
        if gen.dropped_turns:
            console.note(f"dropped the {gen.dropped_turns} oldest turn(s) to fit the context")
        try:
            for chunk in gen:
                if chunk.text:
                    console.write(chunk.text)
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            gen.close()
            console.write("\n")
            console.note("[reply stopped]")
            return
        console.write("\n")
        if self.interactive:
            s = self.session
            console.note(f"[{s.context_left} of {s.engine.max_seq_len} context tokens left]")

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit", "bye"):
            return False
        if name == "help":
            console.note(HELP, style="")
        elif name == "clear":
            self.session.clear()
            console.note("new conversation")
        elif name == "system":
            self.session.set_system(arg or None)
            console.note("system prompt set" if arg else "system prompt removed")
        elif name == "set":
            self.set(arg)
        elif name == "stats":
            self.stats()
        else:
            console.error(f"unknown command /{name} (/help lists them)")
        return True

    def set(self, arg: str) -> None:
        """`/set NAME VALUE`."""
        key, _, value = arg.partition(" ")
        key = key.replace("-", "_")
        if key not in _SETTINGS or not value.strip():
            console.error(f"usage: /set NAME VALUE with NAME one of {', '.join(_SETTINGS)}")
            return
        try:
            parsed = _SETTINGS[key](value.strip())
            if key == "max_tokens":
                assert isinstance(parsed, int)
                check_max_tokens(parsed)
                self.max_tokens = parsed
            else:
                self.params = dataclasses.replace(self.params, **{key: parsed})
        except (ValueError, InvalidArgumentError) as e:
            console.error(f"{key}: {e}")
            return
        console.note(f"{key} = {parsed}")

    def stats(self) -> None:
        """Speed of the last reply and how much context is used."""
        s = self.session
        r = s.last_result
        if r is not None:
            console.note(f"last reply: prefilled {r.prefill_tokens} tok ({r.prefill_tok_s:.1f} tok/s), "
                         f"generated {r.completion_tokens} tok ({r.decode_tok_s:.1f} tok/s), "
                         f"finish {r.finish_reason}", style="")
        console.note(f"context: {s.context_used} of {s.engine.max_seq_len} tokens used, "
                     f"{s.context_left} left", style="")


@app.command()
def chat(
    system: Annotated[Optional[str], typer.Option(
        "--system", show_default=False, help="System prompt")] = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = _D.temperature,
    top_k: TopKOpt = _D.top_k,
    top_p: TopPOpt = _D.top_p,
    min_p: MinPOpt = _D.min_p,
    repeat_penalty: RepeatPenaltyOpt = _D.repeat_penalty,
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
    """
    console.setup_logging(verbose)
    with cli_errors(verbose):
        params = sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repeat_penalty=repeat_penalty, seed=seed)
        check_max_tokens(max_tokens)
        engine = load_engine(ModelOptions(model, device, dtype, max_seq_len, compile, verbose, quantize, group_size))
        interactive = sys.stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        session = engine.chat(system=system)
        Repl(session, params, max_tokens=max_tokens, stop=stop or [], interactive=interactive).run()
