"""Models in the local Hugging Face cache that `hf download` (`huggingface-cli download`) fills.

The cache holds one folder per repository, `models--ORG--NAME/`, with `refs/REVISION` files that
name a commit and `snapshots/COMMIT/` folders of links to the downloaded files. Nothing here
downloads; the environment comes in as an argument (only the CLI reads os.environ).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamarun.errors import CheckpointError

# ORG/NAME, optionally @REVISION, optionally /PATH inside the repository (a .gguf file, original/)
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                      r"(?:@(?P<revision>[\w.-]+))?(?:/(?P<sub>[^@]+))?")


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
    path: Path  # the snapshot folder


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


def snapshot_path(cache: Path, ref: RepoRef) -> Path | None:
    """The snapshot folder of `ref.revision` (a ref name or a commit), or None when not cached."""
    folder = repo_folder(cache, ref.repo_id)
    ref_file = folder / "refs" / ref.revision
    try:
        commit = ref_file.read_text().strip() if ref_file.is_file() else ref.revision
    except OSError:
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


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
    if not path.exists():
        raise CheckpointError(f"{ref.repo_id}{at}: no {ref.sub} in the cached snapshot ({snapshot})")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "original").is_dir():
        return path / "original"  # only Meta's files were downloaded (--include "original/*")
    return path


def scan_cache(cache: Path) -> list[CachedSnapshot]:
    """Every cached model snapshot: one per ref (main first), or per snapshot when none has a ref."""
    found: list[CachedSnapshot] = []
    if not cache.is_dir():
        return found
    for folder in sorted(cache.glob("models--*")):
        parts = folder.name.split("--")[1:]
        if len(parts) < 2:
            continue
        repo_id = f"{parts[0]}/{'--'.join(parts[1:])}"
        refs = folder / "refs"
        named = sorted((p for p in refs.iterdir() if p.is_file()),
                       key=lambda p: (p.name != "main", p.name)) if refs.is_dir() else []
        seen: set[str] = set()
        for ref in named:
            commit = ref.read_text().strip()
            snapshot = folder / "snapshots" / commit
            if snapshot.is_dir() and commit not in seen:
                seen.add(commit)
                found.append(CachedSnapshot(repo_id, ref.name, commit, snapshot))
        if not named and (folder / "snapshots").is_dir():
            for snapshot in sorted((folder / "snapshots").iterdir()):
                found.append(CachedSnapshot(repo_id, snapshot.name, snapshot.name, snapshot))
    return found
