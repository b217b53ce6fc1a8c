"""Error types. Every user-facing failure is a LlamarunError with a one-line message."""


class LlamarunError(Exception):
    """Base class: a problem the user can fix, reported as one line by the CLI."""


class ConfigError(LlamarunError):
    """A model config (params.json, config.json, GGUF metadata) is missing, invalid or unsupported."""


class CheckpointError(LlamarunError):
    """A checkpoint file is missing, unreadable, corrupt or inconsistent with its config."""


class TokenizerError(LlamarunError):
    """A tokenizer file is missing, unreadable or of an unknown kind."""


class PromptTooLongError(LlamarunError):
    """The prompt does not fit in the model's context."""


class InvalidArgumentError(LlamarunError, ValueError):
    """A parameter value is out of range (sampling settings, device, dtype, ...)."""
