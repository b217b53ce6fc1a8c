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


def clean_message(text: str) -> str:
    """`text` without terminal escape sequences or control characters (tabs and newlines kept).

    Messages can carry text from untrusted files (tensor names, metadata) and from libraries
    (torch's own messages hold bold escapes); printed raw, they could restyle or rewrite the
    user's terminal."""
    import re

    return re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?"
                  r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
