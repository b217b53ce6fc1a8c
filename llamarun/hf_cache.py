"""Models in the local Hugging Face cache that `hf download` (`huggingface-cli download`) fills.

The cache holds one folder per repository, `models--ORG--NAME/`, with `refs/REVISION` files that
name a commit and `snapshots/COMMIT/` folders of links to the downloaded files. Nothing here
downloads; the environment comes in as an argument (only the CLI reads os.environ).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamarun import files
from llamarun.errors import CheckpointError, clean_message

# ORG/NAME, optionally @REVISION, optionally /PATH inside the repository (a .gguf file, original/)
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                      r"(?:@(?P<revision>[\w.-]+))?(?:/(?P<sub>[^@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")  # what hf_hub_download writes in refs/ and snapshots/


@dataclass(frozen=True)
class RepoRef:
    """A parsed repo id: `meta-llama/Llama-3.2-1B-Instruct[@revision][/path/in/repo]`."""

    repo_id: str
    revision: str = "main"
    sub: str = ""


@dataclass(frozen=True)
class CachedSnapshot:
    """One downloaded revision of a repository."""

    repo_id: str
    revision: str  # the ref (main) or, without one, the commit
    commit: str
    path: Path  # the snapshot folder (the repository's folder when `error` is set)
    error: str | None = None  # why the repository's refs could not be used


def hub_cache_dir(env: Mapping[str, str], *, home: Path | None = None) -> Path:
    """The hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return (home or Path.home()) / ".cache" / "huggingface" / "hub"


def parse_repo_id(text: str) -> RepoRef | None:
    """The repo id in `text`, or None when it cannot be one (a path such as ./x, /x or ~/x)."""
    m = _REPO_ID.fullmatch(text.strip())
    if m is None or ".." in text:
        return None
    return RepoRef(m["repo"], m["revision"] or "main", (m["sub"] or "").strip("/"))


def repo_folder(cache: Path, repo_id: str) -> Path:
    """`models--ORG--NAME` for ORG/NAME."""
    return cache / ("models--" + repo_id.replace("/", "--"))


def read_ref(folder: Path, revision: str) -> str | None:
    """The commit `refs/REVISION` names in a repository's folder (None without such a ref).

    The file must be a regular file of at most 1 KiB holding a 40-digit hex commit hash;
    anything else (a FIFO, odd bytes, a path) is a CheckpointError naming the file.
    """
    ref_file = folder / "refs" / revision
    if not os.path.lexists(ref_file):
        return None
    text = files.read_text(ref_file, what="refs file", error=CheckpointError,
                           limit=files.MAX_REF_BYTES)
    commit = text.strip()
    if not _COMMIT.fullmatch(commit):
        raise CheckpointError(f"{ref_file}: not a commit hash ({_short(commit)})")
    return commit


def _cached_snapshot(folder: Path, commit: str, named_by: str) -> Path:
    """snapshots/COMMIT, which must be a folder that resolves inside the repository's folder."""
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        raise CheckpointError(f"{named_by} names commit {commit}, which has no snapshot in {folder}")
    if not _inside(folder, os.path.realpath(snapshot)):
        raise CheckpointError(f"{snapshot}: points outside the cached repository ({folder})")
    return snapshot


def snapshot_path(cache: Path, ref: RepoRef) -> Path | None:
    """The snapshot folder of `ref.revision` (a ref name or a commit hash), or None when not
    cached; CheckpointError when the cache holds a ref that is not sound (see read_ref)."""
    folder = repo_folder(cache, ref.repo_id)
    if not folder.is_dir():
        return None
    commit = read_ref(folder, ref.revision)
    if commit is None:
        if not _COMMIT.fullmatch(ref.revision):
            return None
        commit = ref.revision  # a commit hash given directly
    if not (folder / "snapshots" / commit).is_dir():
        return None  # an interrupted download: not cached
    return _cached_snapshot(folder, commit, str(folder / "refs" / ref.revision))


def _inside(folder: Path, resolved: str) -> bool:
    root = os.path.realpath(folder)
    return resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep)


def _check_links(folder: Path, path: Path) -> None:
    """Every link at `path` (or directly in it) must point into the repository's folder, as
    hf_hub_download's links to blobs/ do (a blob may itself link on: not followed here)."""
    entries = [path] if not path.is_dir() or path.is_symlink() else [path, *path.iterdir()]
    for entry in entries:
        if entry.is_symlink():
            target = os.path.normpath(os.path.join(entry.parent, os.readlink(entry)))
            if not _inside(folder, os.path.realpath(os.path.dirname(target))):
                raise CheckpointError(f"{entry}: points outside the cached repository ({folder})")


def download_hint(repo_id: str) -> str:
    """How to fetch a repository into the cache (llamarun itself never downloads)."""
    return f"download it with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`)"


def resolve_repo(ref: RepoRef, cache: Path) -> Path:
    """The checkpoint path for a cached repository; CheckpointError saying how to get it if absent."""
    snapshot = snapshot_path(cache, ref)
    at = "" if ref.revision == "main" else f" at revision {ref.revision}"
    if snapshot is None:
        raise CheckpointError(f"{ref.repo_id}{at} is not in the Hugging Face cache ({cache}); "
                              + download_hint(ref.repo_id))
    path = snapshot / ref.sub if ref.sub else snapshot
    if ref.sub:
        found = _try_to_load_from_cache(ref.repo_id, ref.sub, cache, snapshot.name)
        path = Path(found) if found is not None else path
    if not path.exists():
        raise CheckpointError(f"{ref.repo_id}{at}: no {ref.sub} in the cached snapshot ({snapshot})")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "original").is_dir():
        path = path / "original"  # only Meta's files were downloaded (--include "original/*")
    _check_links(repo_folder(cache, ref.repo_id), path)
    return path


def _try_to_load_from_cache(repo_id: str, filename: str, cache: Path, commit: str) -> str | None:
    """huggingface_hub's own lookup of a file in a snapshot (None for a folder or no file).

    Given the commit hash (already checked), it reads no refs file."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=commit)
    except ValueError:  # a filename huggingface_hub refuses (e.g. with backslashes)
        return None
    return found if isinstance(found, str) else None


def scan_cache(cache: Path) -> list[CachedSnapshot]:
    """Every cached model snapshot: one per ref (main first), or per snapshot when none has a ref.

    A repository whose refs are not sound (odd bytes, a huge file, a FIFO, a commit without a
    snapshot, a link out of the cache) gives one snapshot entry with `error` set, and the
    others are still listed. (huggingface_hub's scan_cache_dir reads each refs file whole,
    blocks on a FIFO and stops the whole scan at bytes that are not UTF-8, so it is not used
    for listing; try_to_load_from_cache is, for files in a snapshot.)
    """
    found: list[CachedSnapshot] = []
    if not cache.is_dir():
        return found
    try:
        folders = sorted(cache.glob("models--*"))
    except OSError:
        return found
    for folder in folders:
        parts = folder.name.split("--")[1:]
        if len(parts) < 2 or not folder.is_dir():
            continue
        repo_id = _printable(f"{parts[0]}/{'--'.join(parts[1:])}")
        try:
            found.extend(_repo_snapshots(folder, repo_id))
        except (CheckpointError, OSError) as e:
            message = str(e) if isinstance(e, CheckpointError) else f"{folder}: {e.strerror or e}"
            found.append(CachedSnapshot(repo_id, "?", "", folder, error=message))
    return found


def _repo_snapshots(folder: Path, repo_id: str) -> list[CachedSnapshot]:
    refs = folder / "refs"
    named = sorted((p.name for p in refs.iterdir() if not p.is_dir()),
                   key=lambda n: (n != "main", n)) if refs.is_dir() else []
    out: list[CachedSnapshot] = []
    seen: set[str] = set()
    for name in named:
        commit = read_ref(folder, name)
        assert commit is not None
        snapshot = _cached_snapshot(folder, commit, str(refs / _printable(name)))
        if commit not in seen:
            seen.add(commit)
            out.append(CachedSnapshot(repo_id, _printable(name), commit, snapshot))
    if not named and (folder / "snapshots").is_dir():
        for snapshot in sorted((folder / "snapshots").iterdir()):
            if _COMMIT.fullmatch(snapshot.name) and snapshot.is_dir():
                out.append(CachedSnapshot(repo_id, snapshot.name, snapshot.name,
                                          _cached_snapshot(folder, snapshot.name, str(snapshot))))
    return out


def _printable(text: str) -> str:
    """A name from the file system as text that prints: undecodable bytes become U+FFFD and
    escape codes go."""
    return clean_message(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _short(text: str, limit: int = 60) -> str:
    text = _printable(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")
