"""llamarun: run Meta Llama checkpoints (Meta, Hugging Face, GGUF) on CPU and CUDA."""

from llamarun.errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    LlamarunError,
    PromptTooLongError,
    TokenizerError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InvalidArgumentError",
    "LlamarunError",
    "PromptTooLongError",
    "TokenizerError",
    "__version__",
]
