"""Every model llamarun can find: ./checkpoints, $LLAMARUN_MODEL, the Hugging Face cache, the default.

Each is described from its config alone (no weights are read): format, size on disk, parameter
count and context length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from llamarun.errors import CheckpointError, LlamarunError, clean_message
from llamarun.hf_cache import hub_cache_dir, scan_cache
from llamarun.loaders import detect_layout, read_checkpoint
from llamarun.resolve import CHECKPOINTS_DIR, ENV_VAR, embedded_default_model, find_checkpoints, resolve_model


@dataclass(frozen=True)
class ModelEntry:
    """One model found, described; `name` is what to pass to --model."""

    name: str
    source: str  # "checkpoints" | "LLAMARUN_MODEL" | "hf-cache" | "default"
    path: Path
    layout: str | None = None  # "meta" | "hf" | "gguf"; None when it could not be read
    size_bytes: int = 0
    n_params: int | None = None
    context: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data."""
        return {**asdict(self), "path": str(self.path)}


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links followed, as the HF cache uses them)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            continue
    return total


def describe(name: str, source: str, path: Path) -> ModelEntry:
    """Read the config (not the weights) of the checkpoint at `path`."""
    try:
        raw = read_checkpoint(path)
    except LlamarunError as e:
        return ModelEntry(name, source, path, size_bytes=disk_size(path),
                          error=clean_message(str(e)))
    return ModelEntry(name, source, path, layout=raw.layout, size_bytes=disk_size(path),
                      n_params=raw.args.n_params, context=raw.args.max_seq_len)


def _snapshot_checkpoints(snapshot: Path) -> list[tuple[str, Path]]:
    """(suffix for the name, path) of the checkpoints in one cached snapshot."""
    try:
        layout, _ = detect_layout(snapshot)
        if layout != "gguf":
            return [("", snapshot)]
    except CheckpointError:
        pass
    found = [(f"/{f.name}", f) for f in sorted(snapshot.glob("*.gguf"))]
    original = snapshot / "original"
    if not found and original.is_dir():
        try:
            detect_layout(original)
            found.append(("/original", original))
        except CheckpointError:
            pass
    return found


def find_models(*, env: Mapping[str, str], cwd: Path,
                default: Callable[[], tuple[Path | None, str]] | None = None) -> list[ModelEntry]:
    """Every model found, in the order --model resolution would consider them.

    `default` returns the embedded default model's path (None when absent) and a hint.
    """
    entries: list[ModelEntry] = []
    folder = cwd / CHECKPOINTS_DIR
    if folder.is_dir():
        for path in find_checkpoints(folder):
            entries.append(describe(str(path.relative_to(cwd)), CHECKPOINTS_DIR, path))
    value = env.get(ENV_VAR, "")
    if value:
        try:
            entries.append(describe(value, ENV_VAR, resolve_model(None, env=env, cwd=cwd).path))
        except LlamarunError as e:
            entries.append(ModelEntry(value, ENV_VAR, Path(value), error=str(e)))
    for snap in scan_cache(hub_cache_dir(env)):
        if snap.error is not None:  # this repository only: the others are still listed
            entries.append(ModelEntry(snap.repo_id, "hf-cache", snap.path,
                                      error=clean_message(snap.error)))
            continue
        at = "" if snap.revision == "main" else f"@{snap.revision}"
        for suffix, path in _snapshot_checkpoints(snap.path):
            entries.append(describe(f"{snap.repo_id}{at}{clean_message(suffix)}", "hf-cache", path))
    try:
        path, _ = (default or embedded_default_model)()
    except LlamarunError:
        path = None
    if path is not None and path.exists():
        entries.append(describe(str(path), "default", path))
    return entries
