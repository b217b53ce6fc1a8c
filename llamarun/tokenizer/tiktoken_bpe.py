"""Meta's Llama 3 tiktoken `tokenizer.model` (base64 BPE ranks) through `tiktoken`, as in Meta's reference."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from llamarun import files
from llamarun.errors import TokenizerError
from llamarun.tokenizer.base import Tokenizer, valid_text

# Meta's pre-tokenization pattern (meta-llama/llama-models, models/llama3/tokenizer.py).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken can handle <= 400k chars per call without a PanicException.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# Runs of whitespace or non-whitespace longer than this are cut (openai/tiktoken issue 195).
MAX_NO_WHITESPACES_CHARS = 25_000

# The Llama 3.1+ list (meta-llama/llama-models); reserved tokens fill the rest of the 256 slots.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3.1+ special-token names in id order."""
    reserved = [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
    ]
    return [*_NAMED_SPECIAL_TOKENS, *reserved]


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Read a `base64(token) rank` file."""
    ranks: dict[bytes, int] = {}
    data = files.read_bytes(path, what="tiktoken file", error=TokenizerError,
                            limit=files.MAX_TOKENIZER_BYTES)
    lineno = 0
    try:
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as e:
        raise TokenizerError(f"{path} line {lineno} is not 'base64 rank': {e}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3.x tokenizer; `decode` keeps special tokens as their text and replaces invalid UTF-8 (U+FFFD)."""

    kind = "tiktoken"

    def __init__(self, path: Path) -> None:
        self.source = str(path)
        ranks = load_bpe_ranks(path)
        n_base = len(ranks)
        self.special_tokens = {name: n_base + i for i, name in enumerate(llama3_special_tokens())}
        self._model = tiktoken.Encoding(
            name=path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset(self.special_tokens[t] for t in _STOP_TOKENS)
        self.add_bos = True

    def encode(self, text: str, *, bos: bool, eos: bool = False) -> list[int]:
        """Encode like Meta's `Tokenizer.encode(allowed_special=set(), disallowed_special=())`."""
        text = valid_text(text)
        ids: list[int] = []
        for chunk in _chunks(text):
            ids.extend(self._model.encode(chunk, allowed_special=set(), disallowed_special=()))
        return self._with_bos_eos(ids, bos=bos, eos=eos)

    def encode_with_special(self, text: str) -> list[int]:
        """Encode with every special token allowed (Meta's `allowed_special="all"`)."""
        text = valid_text(text)
        ids: list[int] = []
        for chunk in _chunks(text):
            ids.extend(self._model.encode(chunk, allowed_special="all"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode like Meta's reference: byte concatenation, invalid UTF-8 replaced by U+FFFD."""
        self._check_ids(ids)
        return self._model.decode(list(ids))

    def token_bytes(self, id: int) -> bytes:
        """The token's bytes; a special token gives its text."""
        self._check_ids([id])
        return self._model.decode_single_token_bytes(id)

    def piece(self, id: int) -> str:
        """The token's text, with bytes that are not whole UTF-8 characters shown as \\xNN."""
        return self.token_bytes(id).decode("utf-8", errors="backslashreplace")

    def special_id(self, text: str) -> int | None:
        """Id of a Llama 3 special token such as "<|eot_id|>"."""
        return self.special_tokens.get(text)

    def control_tokens(self) -> dict[str, int]:
        """All 256 special tokens, reserved ones included."""
        return self.special_tokens


def _chunks(text: str) -> Iterator[str]:
    """Meta's splitting: 400k-char windows, then no run of >25k whitespace or non-whitespace chars."""
    for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        yield from _split_whitespaces_or_nonwhitespaces(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS)


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    current_len = 0
    current_is_space = s[0].isspace() if s else False
    start = 0
    for i in range(len(s)):
        is_space = s[i].isspace()
        if current_is_space ^ is_space:
            current_len = 1
            current_is_space = is_space
        else:
            current_len += 1
            if current_len > max_len:
                yield s[start:i]
                start = i
                current_len = 1
    yield s[start:]
