"""The terminal while a chat reply streams.

Keys typed during a reply would otherwise be echoed into the middle of it. `ReplyGuard` turns
the terminal's echo and line editing off for the reply (signals stay on), then reads what was
typed: Ctrl-D there ends the chat after the reply, and the first line of text typed is offered
at the next prompt, where it can be edited or sent. It also makes Ctrl-C stop the reply between
two tokens rather than inside one, so the reply ends like any other (its tokens counted, the turn
kept in the conversation); before the first token, and at a second Ctrl-C, it interrupts at once.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from types import FrameType, TracebackType

_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|.)")  # arrow keys and other sequences


class ReplyGuard:
    """`with ReplyGuard(interactive) as guard:` around a streaming reply; call `shown()` after
    each chunk printed and stop when `interrupted` is set. After the block, `typed` holds the
    text typed meanwhile and `eof` whether Ctrl-D was pressed."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.interrupted = False
        self.typed = ""
        self.eof = False
        self._started = False
        self._fd: int | None = None
        self._saved: list | None = None  # termios attributes to put back
        self._handler: object = None
        self._installed = False  # our SIGINT handler is in place

    def shown(self) -> None:
        """A piece of the reply was printed: from now on Ctrl-C waits for the token's end."""
        self._started = True

    def __enter__(self) -> ReplyGuard:
        if not self.interactive:
            return self
        if _main_thread():
            self._handler = signal.signal(signal.SIGINT, self._sigint)
            self._installed = True
        self._quiet_terminal()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            handler = self._handler if self._handler is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, handler)  # type: ignore[arg-type]
        if self._saved is not None:
            self._read_typed()

    def _sigint(self, signum: int, frame: FrameType | None) -> None:
        if not self._started or self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True

    def _quiet_terminal(self) -> None:
        try:
            import termios

            fd = sys.stdin.fileno()
            if not os.isatty(fd):
                return
            saved = termios.tcgetattr(fd)
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~(termios.ECHO | termios.ICANON)  # no echo, keys readable at once
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except (ImportError, OSError, ValueError, AttributeError):
            return  # not a terminal (or not a POSIX one): nothing to guard
        self._fd, self._saved = fd, saved

    def _read_typed(self) -> None:
        import select
        import termios

        assert self._fd is not None and self._saved is not None
        data = b""
        try:
            while select.select([self._fd], [], [], 0)[0] and len(data) < 1 << 16:
                chunk = os.read(self._fd, 4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        finally:
            try:
                termios.tcsetattr(self._fd, termios.TCSANOW, self._saved)
            except (OSError, termios.error):
                pass
        eof_key = self._saved[6][termios.VEOF]
        eof_key = eof_key if isinstance(eof_key, bytes) else bytes([eof_key])
        self.typed, self.eof = typed_text(data, eof_key)


def typed_text(data: bytes, eof_key: bytes = b"\x04") -> tuple[str, bool]:
    """(The first line of text in keys typed raw, whether the end-of-file key came before its
    end): escape sequences dropped, backspaces applied, other control keys ignored."""
    eof = False
    if eof_key and eof_key in data:
        data, eof = data[:data.index(eof_key)], True
    line = re.split(r"[\r\n]", data.decode("utf-8", "replace"), maxsplit=1)[0]
    out: list[str] = []
    for ch in _ESCAPES.sub("", line):
        if ch in "\x7f\b":
            if out:
                out.pop()
        elif ch >= " ":
            out.append(ch)
    return "".join(out), eof


def input_with(prompt: str, text: str) -> str:
    """input(prompt) with `text` already typed at the prompt (editable) where readline is
    loaded; else plain input() (the text is then lost, as the terminal would have lost it)."""
    readline = sys.modules.get("readline")
    if not text or readline is None:
        return input(prompt)
    readline.set_startup_hook(lambda: readline.insert_text(text))
    try:
        return input(prompt)
    finally:
        readline.set_startup_hook()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
