"""The chat REPL: reads messages and /commands, streams replies, saves and resumes conversations."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from llamarun import files
from llamarun.cli import console, settings
from llamarun.cli.distributed import rank0
from llamarun.cli.terminal import ReplyGuard, input_with
from llamarun.errors import InvalidArgumentError, LlamarunError, clean_message
from llamarun.sampling import Constraint, SamplingParams
from llamarun.saved_chat import SavedChat, load_chat, save_chat
from llamarun.session import ChatSession

PROMPT, CONTINUATION, FENCE = ">>> ", "... ", '"""'
HELP = """commands:
  /help                 this help
  /exit                 quit (also Ctrl-D)
  /clear                start a new conversation
  /system TEXT          set the system prompt (empty TEXT removes it)
  /set NAME VALUE       change a setting: temperature, top_k, top_p, min_p, repeat_penalty,
                        seed (or 'none'), max_tokens
  /show                 the settings in force (also /set alone)
  /stats                speed of the last reply and context use
  /save [FILE]          save the conversation as JSON (default: the last file saved or loaded)
  /load FILE            resume a saved conversation (its system prompt and settings too)
  \"\"\"                   start or end a multi-line message
Ctrl-C stops a reply; at the prompt it ends the chat (status 130). Ctrl-D at the prompt
ends it (status 0); during a reply, after the reply. Keys typed during a reply wait at the
next prompt."""



class Repl:
    """Reads messages and commands, streams replies."""

    def __init__(self, session: ChatSession, params: SamplingParams, *, max_tokens: int,
                 stop: list[str], interactive: bool, model: str = "",
                 save_path: Path | None = None, autosave: bool = False) -> None:
        self.session = session
        self.params = params
        self.max_tokens = max_tokens
        self.stop = stop
        self.interactive = interactive
        self.model = model  # recorded in saved files
        self.save_path = save_path  # where /save writes without a FILE
        self.autosave = autosave  # chat --save: write after every reply
        self.failures = 0  # messages that got no reply (piped chat then exits 1)
        self.constraint: Constraint | None = None  # what every reply must match (--json-schema)
        self._typed = ""  # text typed during the last reply, offered at the next prompt
        self._eof_typed = False  # Ctrl-D during the last reply: end after it

    def snapshot(self) -> SavedChat:
        """The conversation and settings as they stand."""
        return SavedChat(messages=[dict(m) for m in self.session.messages],
                         system=self.session.system, model=self.model or None,
                         sampling=self.params, max_tokens=self.max_tokens)

    def resume(self, chat: SavedChat) -> None:
        """Take over a saved conversation: system prompt, turns and settings."""
        self.session.clear()
        self.session.set_system(chat.system)
        self.session.messages = [dict(m) for m in chat.messages]
        self.params = chat.sampling
        if chat.max_tokens is not None:
            self.max_tokens = chat.max_tokens

    def read_line(self, prompt: str) -> str:
        """One input line (EOFError at the end); in a tensor-parallel job, rank 0's."""
        return rank0(lambda: self._read_line(prompt))

    def _read_line(self, prompt: str) -> str:
        if self.interactive:
            if self._eof_typed:
                raise EOFError
            typed, self._typed = self._typed, ""
            return input_with(prompt, typed)
        line = files.read_line(sys.stdin, what="chat input", error=InvalidArgumentError)
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
        size = len(rest)
        while True:
            if size > files.MAX_LINE_CHARS:  # an endless block of short lines
                raise InvalidArgumentError(f'chat input: a {FENCE} block longer than '
                                           f"{files.MAX_LINE_CHARS >> 20} Mi characters")
            try:
                line = self.read_line(CONTINUATION)
            except EOFError:
                if not lines:
                    raise
                # Input ended inside a block: send what was read rather than drop it silently.
                console.note(f'end of input inside a {FENCE} block: sending the message as read')
                return "\n".join(lines)
            if line.rstrip().endswith(FENCE):
                tail = line.rstrip()[:-len(FENCE)]
                if tail:
                    lines.append(tail)
                return "\n".join(lines)
            lines.append(line)
            size += len(line) + 1

    def run(self) -> int:
        """Loop until /exit, end of input or Ctrl-C at the prompt; return the exit status
        (130 after Ctrl-C, as for every command, else 0)."""
        if self.interactive:
            console.note(f"chat format {self.session.engine.chat_format.name}, context "
                         f"{self.session.engine.max_seq_len} tokens; /help for commands")
        while True:
            try:
                text = self.read_message()
            except (EOFError, KeyboardInterrupt) as e:
                if self.interactive:
                    console.err.print()
                return 130 if isinstance(e, KeyboardInterrupt) else 0
            except LlamarunError as e:  # a message too long to be one
                if not self.interactive:
                    raise
                console.error(str(e))
                continue
            if text.startswith("/"):
                if self.command(text) is False:
                    return 0
            elif text.strip():
                self.reply(text)

    def reply(self, text: str) -> None:
        """Send one message and stream the reply."""
        try:
            gen = self.session.send(text, sampling=self.params, max_new_tokens=self.max_tokens,
                                    stop=self.stop, constraint=self.constraint)
        except LlamarunError as e:
            self.failures += 1
            console.error(str(e))
            return
        if gen.dropped_turns:
            console.note(f"dropped the {gen.dropped_turns} oldest turn(s) to fit the context")
        # Ctrl-C stops the reply between two tokens (a KeyboardInterrupt inside the model's
        # step would end the stream without its result); typed keys stay off the screen.
        guard = ReplyGuard(self.interactive)
        try:
            with guard:
                for chunk in gen:
                    if chunk.text:
                        console.write(chunk.text)
                        guard.shown()
                    if guard.interrupted:
                        break
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            guard.interrupted = True
        finally:
            self._typed, self._eof_typed = guard.typed, guard.eof
        if guard.interrupted:
            gen.close()  # the reply so far is kept, and counted by /stats
            console.write("\n")
            console.note("[reply stopped]")
            return
        console.write("\n")
        if self.autosave and self.save_path is not None:
            self.save(str(self.save_path), quiet=True)
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
        elif name == "set" and not arg:
            self.show()
        elif name == "set":
            self.set(arg)
        elif name == "show":
            self.show()
        elif name == "stats":
            self.stats()
        elif name == "save":
            self.save(arg)
        elif name == "load":
            self.load(arg)
        else:
            console.error(f"unknown command /{name} (/help lists them)")
        return True

    def set(self, arg: str) -> None:
        """`/set NAME VALUE`."""
        key, _, value = arg.partition(" ")
        key = key.replace("-", "_")
        if key not in settings.SETTINGS or not value.strip():
            console.error(f"usage: /set NAME VALUE with NAME one of {', '.join(settings.SETTINGS)}")
            return
        try:
            parsed = settings.parse(key, value)
            if key == "max_tokens":
                assert isinstance(parsed, int)
                self.max_tokens = parsed
            else:
                self.params = dataclasses.replace(self.params, **{key: parsed})
        except LlamarunError as e:
            console.error(str(e))
            return
        console.note(f"{key} = {parsed}")

    def save(self, arg: str, *, quiet: bool = False) -> None:
        """`/save [FILE]`: write the conversation atomically."""
        path = Path(arg).expanduser() if arg else self.save_path
        if path is None:
            console.error("usage: /save FILE (no file saved or loaded yet)")
            return
        try:
            save_chat(path, self.snapshot())
        except OSError as e:
            console.error(f"cannot save to {path}: {e.strerror or e}")
            return
        self.save_path = path
        if not quiet:
            turns = len(self.session.messages) // 2
            console.note(f"saved {turns} turn(s) to {path}")

    def load(self, arg: str) -> None:
        """`/load FILE`: resume a saved conversation (the current one is replaced)."""
        if not arg:
            console.error("usage: /load FILE")
            return
        path = Path(arg).expanduser()
        try:
            chat = load_chat(path)
        except LlamarunError as e:  # the conversation so far stays as it was
            console.error(str(e))
            return
        except KeyboardInterrupt:  # Ctrl-C while a big file is read: keep chatting
            if not self.interactive:
                raise
            console.note("[load cancelled]")
            return
        self.resume(chat)
        if not self.autosave:
            self.save_path = path
        console.note(resumed_note(chat, path, self.model))

    def show(self) -> None:
        """`/show`: the settings in force, one per line (as Ollama's `/show parameters`)."""
        p = self.params
        rows = [(name, "none" if getattr(p, name) is None else str(getattr(p, name)))
                for name in settings.SAMPLING_FIELDS]
        rows.append(("max_tokens", str(self.max_tokens)))
        rows.append(("stop", ", ".join(repr(s) for s in self.stop) or "none"))
        system = self.session.system
        rows.append(("system", "none" if not system else repr(
            system if len(system) <= 60 else system[:57] + "...")))
        if self.model:
            rows.append(("model", self.model))
        rows.append(("context", f"{self.session.engine.max_seq_len} tokens"))
        width = max(len(k) for k, _ in rows)
        console.note("\n".join(f"{k:<{width}}  {v}" for k, v in rows), style="")

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
        state = getattr(s.engine, "compile_state", None)
        if state is not None:
            console.note(f"compiled decode step: {state}", style="")


def resumed_note(chat: SavedChat, path: Path, model: str) -> str:
    """`resumed 3 turn(s) from FILE`, and the model it was saved with when that differs."""
    note = f"resumed {len(chat.messages) // 2} turn(s) from {path}"
    if chat.model and chat.model != model:
        note += f" (saved with {chat.model[:200]})"
    return clean_message(note)  # the model name comes from the file: no escape codes
