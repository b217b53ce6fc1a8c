"""The tokenizer interface shared by the SentencePiece, tiktoken, Hugging Face and GGUF implementations."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cached_property

from llamarun.errors import TokenizerError


class Tokenizer(ABC):
    """Text <-> token ids, with the special ids generation and chat formatting need."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: frozenset[int]
    add_bos: bool
    # A Jinja chat template that came with the tokenizer itself (HF tokenizer_config, GGUF metadata).
    chat_template: str | None = None
    # Where the tokenizer was loaded from, for messages.
    source: str = ""

    @abstractmethod
    def encode(self, text: str, *, bos: bool, eos: bool = False) -> list[int]:
        """Encode `text`; special-token text inside it is encoded as plain text, never as special ids."""

    @abstractmethod
    def encode_with_special(self, text: str) -> list[int]:
        """Encode `text` turning special-token text into special ids; never adds BOS or EOS itself."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids exactly as the reference library does (what it skips is documented per class)."""

    @abstractmethod
    def token_bytes(self, id: int) -> bytes:
        """Raw bytes the token contributes in the middle of a text (SentencePiece's `▁` is a space)."""

    @abstractmethod
    def piece(self, id: int) -> str:
        """Human-readable piece for display (`llamarun tokenize`)."""

    @abstractmethod
    def special_id(self, text: str) -> int | None:
        """Id of the special token spelled `text` (e.g. "<|eot_id|>"), or None."""

    @abstractmethod
    def control_tokens(self) -> Mapping[str, int]:
        """The special (control) tokens by their text: what message content must never produce."""

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """Ids of the control tokens."""
        return frozenset(self.control_tokens().values())

    @cached_property
    def _control_pattern(self) -> re.Pattern[str] | None:
        # Longest text first, so the leftmost match is also the longest one at its position.
        texts = sorted(self.control_tokens(), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """`text` cut where `encode_with_special` finds control tokens: (piece, id) for those, (piece, None) between.

        The pieces join back to `text`.
        """
        pattern = self._control_pattern
        if pattern is None:
            return [(text, None)] if text else []
        tokens = self.control_tokens()
        pieces: list[tuple[str, int | None]] = []
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                pieces.append((text[start : m.start()], None))
            pieces.append((m.group(), tokens[m.group()]))
            start = m.end()
        if start < len(text):
            pieces.append((text[start:], None))
        return pieces

    def is_byte_run_token(self, id: int) -> bool:
        """Whether the token joins a byte run that the decoder resolves as a whole (HF ByteFallback)."""
        return False

    def _with_bos_eos(self, ids: list[int], *, bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"tokenizer {self.source or self.kind} has no BOS token")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"tokenizer {self.source or self.kind} has no EOS token")
            ids = [*ids, self.eos_id]
        return ids

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is out of range for vocabulary size {self.vocab_size}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"


def valid_text(text: str) -> str:
    """`text` with any lone surrogate (not Unicode, cannot be UTF-8: a str decoded with
    surrogateescape, or built from broken JSON) replaced by U+FFFD, as invalid UTF-8 input is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
