"""One reader per kind of file or stream llamarun reads, each with a size limit.

Only regular files are read: a file is opened without blocking (a FIFO would otherwise wait
for a writer forever) and checked on the open descriptor, so a FIFO, a device such as
/dev/zero, a socket or a folder is refused with a line saying what it is. Every reader stops
at its limit, so memory stays bounded whatever the file or stream holds; parsed JSON is
refused when it nests deeper than any file llamarun reads does.

Each reader takes the LlamarunError subclass its caller reports (ConfigError for a config,
TokenizerError for a tokenizer file, ...), so the one line names the kind of problem.
Imports only errors: the tokenizer package, config and the loaders all use it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from llamarun.errors import LlamarunError

MiB = 1 << 20
MAX_JSON_BYTES = 64 * MiB  # configs, indexes, tokenizer_config.json, saved chats
MAX_JSON_DEPTH = 64  # the deepest file llamarun reads (a tokenizer_config.json) nests about 5
MAX_TOKENIZER_BYTES = 256 * MiB  # tokenizer.json files reach tens of MiB (Gemma's is 33)
MAX_TEMPLATE_BYTES = 4 * MiB  # chat templates are kilobytes
MAX_TEXT_BYTES = 64 * MiB  # a prompt or a perplexity text, from a file or stdin
MAX_REF_BYTES = 1024  # an HF-cache refs/ file holds one 40-character commit hash
MAX_LINE_CHARS = 16 * MiB  # one line typed or piped into chat

ErrorType = type[LlamarunError]


def file_kind(mode: int) -> str:
    """'a folder', 'a FIFO (named pipe)', 'a device file', 'a socket' for a stat mode."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _not_found(path: Path, what: str) -> str:
    if path.is_symlink():
        return (f"{path}: {what} is a dangling link (the file it points to is missing; an "
                "incomplete download?)")
    return f"{path}: {what} not found"


def check_regular(path: Path, *, what: str, error: ErrorType) -> int:
    """The size of `path`; `error` unless it is a regular file (links followed).

    For files a library opens itself (safetensors, GGUF): prefer `open_regular` otherwise.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(_not_found(path, what)) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise error(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} is {file_kind(st.st_mode)}, not a regular file")
    return st.st_size


def open_regular(path: Path, *, what: str, error: ErrorType, limit: int | None = None) -> IO[bytes]:
    """`path` opened for reading in binary; `error` unless it is a regular file of at most
    `limit` bytes. The check is made on the open descriptor, so the file cannot be swapped
    for a FIFO between a check and the open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(_not_found(Path(path), what)) from None
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {what} is {file_kind(st.st_mode)}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise error(f"{path}: {what} is {_size(st.st_size)}, larger than the "
                        f"{_size(limit)} such a file can be")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, *, what: str, error: ErrorType, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (checked again while reading:
    a file that grows past it is refused too)."""
    with open_regular(path, what=what, error=error, limit=limit) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > limit:
        raise error(f"{path}: {what} is larger than the {_size(limit)} such a file can be")
    return data


def read_text(path: Path, *, what: str, error: ErrorType, limit: int) -> str:
    """A UTF-8 text file of at most `limit` bytes (a leading BOM dropped)."""
    data = read_bytes(path, what=what, error=error, limit=limit)
    return decode_utf8(data, source=f"{path}: {what}", error=error)


def decode_utf8(data: bytes, *, source: str, error: ErrorType) -> str:
    """`data` as UTF-8 text; `error` naming `source` and the first bad byte otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{source} is not UTF-8 text (invalid byte at offset {e.start})") from None


def read_json(path: Path, *, what: str, error: ErrorType, limit: int = MAX_JSON_BYTES,
              missing_ok: bool = False) -> dict[str, Any] | None:
    """A JSON object from a regular file of at most `limit` bytes, nesting at most
    MAX_JSON_DEPTH deep. With `missing_ok`, None when there is no such file (a dangling
    link is still an error: an incomplete download)."""
    if missing_ok and not os.path.lexists(path):
        return None
    text = read_text(path, what=what, error=error, limit=limit)
    data = parse_json(text, source=f"{path}", error=error)
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must hold a JSON object, not {_json_type(data)}")
    return data


def parse_json(text: str | bytes, *, source: str, error: ErrorType,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parsed JSON, or `error` naming `source`: malformed, nested deeper than `max_depth`,
    or holding numbers Python refuses (integers of thousands of digits)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise error(f"{source}: not valid JSON (nested too deeply: more than {max_depth} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:  # "Exceeds the limit (4300 digits)"
        raise error(f"{source}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if json_depth(data, max_depth) > max_depth:
        raise error(f"{source}: not valid JSON (nested too deeply: more than {max_depth} levels)")
    return data


def json_depth(data: Any, stop: int) -> int:
    """How deep lists and dicts nest in `data` (a scalar is 0), counting no further than
    `stop` + 1. Walks without recursion, so any depth is safe to measure."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop:
            return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def read_stream(stream: IO[bytes], *, what: str, error: ErrorType, limit: int = MAX_TEXT_BYTES) -> bytes:
    """All of a binary stream (stdin), refusing one longer than `limit` bytes as soon as it
    passes it: an endless stream (`< /dev/zero`) ends in one line and bounded memory."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(min(MiB, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise error(f"{what} is longer than {_size(limit)}; give a shorter text")


def read_line(stream: IO[str], *, what: str, error: ErrorType, limit: int = MAX_LINE_CHARS) -> str:
    """One line of a text stream ('' at its end), refusing a line longer than `limit`
    characters (an endless stream without newlines, `< /dev/zero`) once that much was read."""
    line = stream.readline(limit + 1)
    if len(line) > limit and not line.endswith("\n"):
        raise error(f"{what}: a line longer than {_size(limit, 'characters')}")
    return line


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(value), "a number")


def _size(n: int, unit: str = "bytes") -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} Mi{'B' if unit == 'bytes' else ' ' + unit}"
    return f"{n:,} {unit}"
