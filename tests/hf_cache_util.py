"""A fake Hugging Face hub cache, laid out as `hf download` leaves it, linking to the fixtures."""

from __future__ import annotations

from pathlib import Path


def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path], *,
                 commit: str = "0123456789abcdef0123456789abcdef01234567",
                 ref: str | None = "main") -> Path:
    """models--ORG--NAME/{refs/REF, blobs/, snapshots/COMMIT/...}; returns the snapshot folder.

    files maps a path in the repository to a fixture file; blobs link to the fixtures (nothing is
    copied) and snapshot entries link to the blobs with relative links, as in a real cache.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for i, (name, source) in enumerate(sorted(files.items())):
        blob = repo / "blobs" / f"{commit[:8]}{i:04d}"
        if not blob.exists():
            blob.symlink_to(source.resolve())
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        depth = len(Path(name).parts) + 1  # up to the repository folder
        target.symlink_to(Path(*[".."] * depth) / "blobs" / blob.name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Every file of a fixture folder, under `prefix` in the repository."""
    return {f"{prefix}{f.name}": f for f in folder.iterdir() if f.is_file()}


def hub_write(cache: Path, repo_id: str, files: dict[str, bytes], *,
              commit: str = "0123456789abcdef0123456789abcdef01234567",
              revision: str = "main") -> Path:
    """Write files into `cache` with huggingface_hub's own cache writers, step by step as
    hf_hub_download does after its download (no network): blob under blobs/ (named by its
    etag, here the sha256), the snapshot's pointer link made by _create_symlink, and the
    revision's ref by _cache_commit_hash_for_specific_revision. Returns the snapshot folder."""
    import hashlib
    import os

    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision, _create_symlink, _get_pointer_path,
        repo_folder_name,
    )

    storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    for name, data in files.items():
        blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
        pointer = _get_pointer_path(storage, commit, name)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _cache_commit_hash_for_specific_revision(storage, revision, commit)
        if not os.path.exists(blob):
            Path(blob).write_bytes(data)
        if not os.path.exists(pointer):
            _create_symlink(blob, pointer, new_blob=True)
    return Path(storage) / "snapshots" / commit
