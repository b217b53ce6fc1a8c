"""Checks on the files a checkpoint names before any of them is opened.

Only regular files are read: a FIFO would block the reader forever, a device file such as
/dev/zero never ends, and a folder or a dangling link where a weight file should be deserves a
message saying so rather than a library's read error. Index entries stay inside their folder.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from llamarun import files
from llamarun.errors import CheckpointError
from llamarun.files import file_kind

# Files a checkpoint folder may hold besides its weights: each is read by some loader, so none
# may be a FIFO or a device (checked once, up front, by detect_layout).
SIDE_FILES = ("config.json", "params.json", "generation_config.json", "tokenizer.json",
              "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_regular(path: Path, *, what: str = "weight file", listed_in: Path | None = None) -> None:
    """Raise CheckpointError unless `path` is a regular file (after following links).

    `listed_in` names the index that listed the file, for the message when it is missing.
    """
    if listed_in is not None and not os.path.lexists(path):
        raise CheckpointError(f"{path}: {what} listed in {listed_in.name} is missing")
    files.check_regular(path, what=what, error=CheckpointError)


def check_side_files(folder: Path) -> None:
    """Raise CheckpointError when a file a loader will read in `folder` exists but is not a
    regular file (a FIFO named tokenizer.json must not hang the tokenizer's reader)."""
    for name in SIDE_FILES:
        path = folder / name
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # absent (or dangling): the reader that needs it says so
        if not _regular(mode):
            raise CheckpointError(f"{path}: {file_kind(mode)}, not a regular file")


def index_entry(folder: Path, index: Path, key: object, value: object) -> Path:
    """The weight file an index's weight_map names, refusing anything that leaves `folder`.

    Entries are file names relative to the index's folder (sub-folders allowed); an absolute
    path, a drive, `..`, a NUL byte or a non-string value is an error naming the index.
    """
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{index}: weight_map[{_short(key)}] must be a file name, got "
                              f"{_short(value)}")
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if (posix.is_absolute() or windows.is_absolute() or windows.drive or "\0" in value
            or ".." in posix.parts or ".." in windows.parts):
        raise CheckpointError(f"{index}: weight_map[{_short(key)}] = {_short(value)} points "
                              "outside the checkpoint folder")
    return folder / value


def _regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def file_size(path: Path) -> int:
    """Size in bytes of a file (0 when it cannot be read)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
