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
