"""A conversation saved as JSON: the file format, an atomic write, and validation on reading.

    {"format": "llamarun-chat", "version": 1, "model": "...", "system": "..." | null,
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...],
     "sampling": {"temperature": 0.8, ...}, "max_tokens": 512}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamarun.errors import InvalidArgumentError
from llamarun.sampling import SamplingParams

FORMAT = "llamarun-chat"
VERSION = 1
_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass(frozen=True)
class SavedChat:
    """What a saved conversation holds. messages are user/assistant turns, without the system prompt."""

    messages: list[dict[str, str]]
    system: str | None = None
    model: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to the file."""
        return {"format": FORMAT, "version": VERSION, "model": self.model, "system": self.system,
                "messages": [dict(m) for m in self.messages],
                "sampling": dataclasses.asdict(self.sampling), "max_tokens": self.max_tokens}


def save_chat(path: str | Path, chat: SavedChat) -> None:
    """Write `chat` to `path` atomically: a temporary file beside it, flushed, then renamed.

    A crash or Ctrl-C leaves the old file or the new one, never part of one.
    """
    path = Path(path)
    data = json.dumps(chat.to_json(), ensure_ascii=False, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_chat(path: str | Path) -> SavedChat:
    """Read a saved chat; InvalidArgumentError (one line, naming the file) for anything else."""
    path = Path(path)

    def bad(reason: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{path}: not a saved llamarun chat ({reason})")

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgumentError(f"{path}: is a folder, not a saved chat") from None
    except OSError as e:
        raise InvalidArgumentError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f'no "format": "{FORMAT}"')
    if data.get("version") != VERSION:
        raise bad(f"version {data.get('version')!r}; this llamarun reads version {VERSION}")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise bad('"system" must be text or null')
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad('"model" must be text or null')
    return SavedChat(messages=_messages(data.get("messages"), bad), system=system or None,
                     model=model, sampling=_sampling(data.get("sampling", {}), bad),
                     max_tokens=_max_tokens(data.get("max_tokens"), bad))


def _messages(value: object, bad: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise bad('"messages" must be a list')
    out = []
    for i, m in enumerate(value):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise bad(f"message {i + 1} must be an object with text content")
        if m.get("role") != expected:
            raise bad(f"message {i + 1} has role {m.get('role')!r}; turns alternate user, "
                      "assistant, starting with user")
        out.append({"role": expected, "content": m["content"]})
    if len(out) % 2:
        raise bad("the last message has no assistant reply")
    return out


def _sampling(value: object, bad: Any) -> SamplingParams:
    if not isinstance(value, dict):
        raise bad('"sampling" must be an object')
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise bad(f'unknown sampling setting "{unknown[0]}"')
    try:
        return SamplingParams(**value)
    except InvalidArgumentError as e:
        raise bad(f"sampling: {e}") from None


def _max_tokens(value: object, bad: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f'"max_tokens" must be an integer at least 1, got {value!r}')
    return value
