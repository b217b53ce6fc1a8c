"""llamarun: run Meta Llama checkpoints (Meta, Hugging Face, GGUF) on CPU and CUDA."""

from llamarun.config import ModelArgs, RopeScaling
from llamarun.engine import Engine, Generation, GenerationResult, TextChunk, load
from llamarun.errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    LlamarunError,
    PromptTooLongError,
    TokenizerError,
)
from llamarun.loaders import Checkpoint, load_checkpoint
from llamarun.sampling import SamplingParams
from llamarun.session import ChatSession

__version__ = "0.1.0"

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
