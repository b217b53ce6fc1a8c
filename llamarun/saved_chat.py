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
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamarun import files
from llamarun.errors import InvalidArgumentError
from llamarun.sampling import SamplingParams

FORMAT = "llamarun-chat"
VERSION = 1
_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_BYTES = files.MAX_JSON_BYTES  # a conversation of 64 MiB is some thousand times a context


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

    A crash or Ctrl-C leaves the old file or the new one, never part of one. An existing
    file keeps its permission bits (and owner, where this user may set it); a new one gets
    the umask's, as any file this user creates. A link is followed: the file it points to
    is replaced, the link stays.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    data = (json.dumps(chat.to_json(), ensure_ascii=False, indent=1) + "\n").encode("utf-8", "replace")
    try:
        old = os.stat(path)
    except OSError:
        old = None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None and stat.S_ISREG(old.st_mode):
                with contextlib.suppress(OSError):
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
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
    """Read a saved chat; InvalidArgumentError (one line, naming the file) for anything else.

    The file goes through llamarun.files' JSON reader (a regular file of at most 64 MiB,
    nesting bounded), and every check after that is one pass over it: time linear in its size.
    Text that cannot be written back as UTF-8 (lone surrogates from \\ud800-style escapes)
    becomes U+FFFD, so a loaded chat can always be saved again.
    """
    path = Path(path)

    def bad(reason: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{path}: not a saved llamarun chat ({reason})")

    if not os.path.lexists(path):
        raise InvalidArgumentError(f"{path}: no such file")
    data = files.read_bytes(path, what="saved chat", error=InvalidArgumentError,
                            limit=MAX_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    try:
        data = files.parse_json(text, source="JSON", error=InvalidArgumentError)
    except InvalidArgumentError as e:
        raise bad(str(e).removeprefix("JSON: ")) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f'no "format": "{FORMAT}"')
    if data.get("version") != VERSION:
        raise bad(f"version {_short(data.get('version'))}; this llamarun reads version {VERSION}")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise bad('"system" must be text or null')
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad('"model" must be text or null')
    return SavedChat(messages=_messages(data.get("messages"), bad),
                     system=_text(system) or None, model=_text(model),
                     sampling=_sampling(data.get("sampling", {}), bad),
                     max_tokens=_max_tokens(data.get("max_tokens"), bad))


def _text(value: str | None) -> str | None:
    """`value` with lone surrogates (not encodable as UTF-8) replaced by U+FFFD."""
    if value is None:
        return None
    return _SURROGATE.sub("\ufffd", value)  # (json.loads joins the pairs that are valid)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _messages(value: object, bad: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise bad('"messages" must be a list')
    out = []
    for i, m in enumerate(value):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise bad(f"message {i + 1} must be an object with text content")
        if m.get("role") != expected:
            raise bad(f"message {i + 1} has role {_short(m.get('role'))}; turns alternate user, "
                      "assistant, starting with user")
        out.append({"role": expected, "content": _text(m["content"])})
    if len(out) % 2:
        raise bad("the last message has no assistant reply")
    return out


def _sampling(value: object, bad: Any) -> SamplingParams:
    if not isinstance(value, dict):
        raise bad('"sampling" must be an object')
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise bad(f'unknown sampling setting "{unknown[0][:40]}"')
    for key, v in value.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(f"sampling: {key} must be a number, got {_short(v)}")
        if isinstance(v, int) and not -2**63 <= v < 2**63:  # no setting is that big (nor a float)
            raise bad(f"sampling: {key} {_short(v)} is out of range")
    try:
        return SamplingParams(**value)
    except InvalidArgumentError as e:
        raise bad(f"sampling: {e}") from None


def _max_tokens(value: object, bad: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f'"max_tokens" must be an integer at least 1, got {_short(value)}')
    return value
