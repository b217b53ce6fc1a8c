"""Tokenizers (SentencePiece, Meta tiktoken, Hugging Face tokenizer.json) chosen by file contents."""

from __future__ import annotations

import os
import re
from pathlib import Path

from llamarun import files
from llamarun.errors import TokenizerError
from llamarun.tokenizer.base import Tokenizer
from llamarun.tokenizer.chat import (
    BrokenChatFormat,
    ChatFormat,
    HFTemplateChatFormat,
    Llama2ChatFormat,
    Llama3ChatFormat,
    PlainChatFormat,
)
from llamarun.tokenizer.stream import StreamDecoder

__all__ = [
    "ChatFormat",
    "StreamDecoder",
    "Tokenizer",
    "detect_tokenizer_kind",
    "load_chat_format",
    "load_tokenizer",
]

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


def detect_tokenizer_kind(path: Path) -> str:
    """"gguf", "hf" (tokenizer.json), "tiktoken" (base64 rank lines) or "sentencepiece" (protobuf), by content."""
    with files.open_regular(path, what="tokenizer file", error=TokenizerError) as f:
        try:
            head = f.read(4096)
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror or e})") from None
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.lstrip().startswith(b"{"):
        return "hf"
    lines = head.splitlines(keepends=True)[:-1] or [head + b"\n"]  # the last line may be cut at 4096 bytes
    if lines and all(_TIKTOKEN_LINE.fullmatch(line) for line in lines[:16]):
        return "tiktoken"
    # A SentencePiece ModelProto starts with field 1 (`pieces`, length-delimited): tag byte 0x0a.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise TokenizerError(f"{path} is not a SentencePiece model, a tiktoken BPE file, a tokenizer.json or a GGUF file")


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer file, or a model folder's tokenizer (tokenizer.json preferred over tokenizer.model)."""
    path = Path(path)
    if path.is_dir():
        folder = path
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.lexists(path / name):  # not a regular file: the reader says what it is
                path = path / name
                break
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {folder}")
    elif not os.path.lexists(path):
        raise TokenizerError(f"tokenizer file not found: {path}")
    folder = path.parent
    kind = detect_tokenizer_kind(path)
    if kind == "gguf":
        from llamarun.tokenizer.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if kind == "hf":
        from llamarun.tokenizer.hf import HFTokenizer

        return HFTokenizer.from_folder(folder, tokenizer_file=path)
    if kind == "tiktoken":
        from llamarun.tokenizer.tiktoken_bpe import TiktokenTokenizer

        return TiktokenTokenizer(path)
    from llamarun.tokenizer.hf import read_stop_ids
    from llamarun.tokenizer.spm import SentencePieceTokenizer

    return SentencePieceTokenizer(path, extra_stop_ids=read_stop_ids(folder))


def load_chat_format(tokenizer: Tokenizer, folder: Path | None = None, *, chat_template: str | None = None) -> ChatFormat:
    """The model's chat format: an explicit or folder HF template wins, else the tokenizer's family.

    A template that cannot be read or compiled gives a BrokenChatFormat, which raises its one-line
    TokenizerError only when a chat is encoded, so raw completion still works.
    """
    from llamarun.tokenizer.hf import find_chat_template

    template, origin = chat_template, ""
    try:
        if template is None and folder is not None and Path(folder).is_dir():
            template, origin = find_chat_template(Path(folder)) or (None, "")
        if template is None and tokenizer.chat_template is not None:
            template, origin = tokenizer.chat_template, tokenizer.source or tokenizer.kind
        if template is not None:
            return HFTemplateChatFormat(tokenizer, template, origin=origin)
    except TokenizerError as e:
        return BrokenChatFormat(tokenizer, e)
    if all(tokenizer.special_id(t) is not None for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>")):
        return Llama3ChatFormat(tokenizer)
    if tokenizer.kind == "sentencepiece" or (
        tokenizer.bos_id is not None and tokenizer.eos_id is not None and tokenizer.kind != "tiktoken"
    ):
        return Llama2ChatFormat(tokenizer)
    return PlainChatFormat(tokenizer)
