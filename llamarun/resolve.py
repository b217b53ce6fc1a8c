"""Which model to run: --model, else $LLAMARUN_MODEL, else ./checkpoints/, else the embedded default.

--model and $LLAMARUN_MODEL take a path, or a Hugging Face repo id found in the local HF cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llamarun.errors import CheckpointError, LlamarunError
from llamarun.hf_cache import hub_cache_dir, parse_repo_id, resolve_repo
from llamarun.loaders import detect_layout

ENV_VAR = "LLAMARUN_MODEL"
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint path and where it came from ("--model", "LLAMARUN_MODEL", "checkpoints", "default")."""

    path: Path
    source: str
    repo_id: str | None = None  # when named by a Hugging Face repo id


def embedded_default_model() -> tuple[Path | None, str]:
    """The embedded default model's path (None when not installed) and how to install it."""
    try:
        from llamarun.default_model import default_model_hint, default_model_path
    except ImportError:
        return None, "not available"
    return default_model_path(), default_model_hint()


def find_checkpoints(folder: Path, *, depth: int = 2) -> list[Path]:
    """Checkpoints (Meta/HF folders, .gguf files) in `folder`, looking `depth` levels down.

    depth 2 covers both checkpoints/<name>/ and checkpoints/<org>/<name>/ layouts.
    """
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() == ".gguf":
            found.append(entry)
        elif entry.is_dir():
            try:
                detect_layout(entry)
                found.append(entry)
            except CheckpointError:
                if depth > 1:
                    found.extend(find_checkpoints(entry, depth=depth - 1))
    return found


def _named(text: str, source: str, env: Mapping[str, str], cwd: Path,
           shown: str | None = None) -> ResolvedModel:
    """A path (relative to cwd), else a repo id in the HF cache; one error when neither exists."""
    shown = shown or source
    path = Path(text).expanduser()
    if (cwd / path).exists():  # an absolute path stays as it is
        return ResolvedModel(cwd / path, source)
    ref = parse_repo_id(text)
    if ref is None:
        raise CheckpointError(f"{path}: no such file or folder (from {shown})")
    cache = hub_cache_dir(env)
    try:
        return ResolvedModel(resolve_repo(ref, cache), source, repo_id=ref.repo_id)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: no such file or folder (from {shown}), and {e}") from None


def resolve_model(model: str | Path | None, *, env: Mapping[str, str], cwd: Path,
                  default: Callable[[], tuple[Path | None, str]] = embedded_default_model) -> ResolvedModel:
    """Pick the checkpoint to load; raise CheckpointError listing what was tried when none is found.

    `env` is the environment (only the CLI reads os.environ); `default` returns the embedded default
    model's path (or None) and a hint on how to get it.
    """
    if model is not None and str(model) != "":
        return _named(str(model), "--model", env, cwd)
    value = env.get(ENV_VAR, "")
    if value:
        return _named(value, ENV_VAR, env, cwd, f"${ENV_VAR}")
    folder = cwd / CHECKPOINTS_DIR
    tried = ["--model (not given)", f"${ENV_VAR} (not set)"]
    if folder.is_dir():
        found = find_checkpoints(folder)
        if len(found) == 1:
            return ResolvedModel(found[0], CHECKPOINTS_DIR)
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(cwd)) for p in found[:4])
            more = f" and {len(found) - 4} more" if len(found) > 4 else ""
            raise CheckpointError(f"several checkpoints under ./{CHECKPOINTS_DIR}/ ({names}{more}); "
                                  "choose one with --model")
        tried.append(f"./{CHECKPOINTS_DIR}/ (no checkpoint inside)")
    else:
        tried.append(f"./{CHECKPOINTS_DIR}/ (missing)")
    try:
        path, hint = default()
    except LlamarunError as e:
        path, hint = None, str(e)
    if path is not None and path.exists():
        return ResolvedModel(path, "default")
    tried.append(f"the embedded default model ({hint})")
    raise CheckpointError("no model found; tried " + ", ".join(tried))
