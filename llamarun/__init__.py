"""llamarun: run Meta Llama checkpoints (Meta, Hugging Face, GGUF) on CPU and CUDA.

The public names are imported on first use (PEP 562), so that `import llamarun` (and with it the
command line, before it can handle Ctrl-C) does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llamarun.errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    LlamarunError,
    PromptTooLongError,
    TokenizerError,
)

if TYPE_CHECKING:
    from llamarun.config import ModelArgs, RopeScaling
    from llamarun.engine import Engine, Generation, GenerationResult, TextChunk, load
    from llamarun.loaders import Checkpoint, load_checkpoint
    from llamarun.sampling import SamplingParams
    from llamarun.session import ChatSession

__version__ = "0.1.0"

_LAZY = {
    "ModelArgs": "llamarun.config", "RopeScaling": "llamarun.config",
    "Engine": "llamarun.engine", "Generation": "llamarun.engine",
    "GenerationResult": "llamarun.engine", "TextChunk": "llamarun.engine",
    "load": "llamarun.engine",
    "Checkpoint": "llamarun.loaders", "load_checkpoint": "llamarun.loaders",
    "SamplingParams": "llamarun.sampling",
    "ChatSession": "llamarun.session",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule: llamarun.server, llamarun.perplexity, ...
        return importlib.import_module(f"llamarun.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"llamarun.{name}":
            raise
    raise AttributeError(f"module 'llamarun' has no attribute {name!r}")


__all__ = [
    "ChatSession",
    "Engine",
    "Generation",
    "GenerationResult",
    "SamplingParams",
    "TextChunk",
    "load",
    "Checkpoint",
    "ModelArgs",
    "RopeScaling",
    "load_checkpoint",
    "CheckpointError",
    "ConfigError",
    "InvalidArgumentError",
    "LlamarunError",
    "PromptTooLongError",
    "TokenizerError",
    "__version__",
]
