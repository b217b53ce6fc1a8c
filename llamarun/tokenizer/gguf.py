"""Tokenizers and chat templates stored in GGUF metadata, rebuilt with the `tokenizers` library.

`tokenizer.ggml.model` "gpt2" is byte-level BPE (tokens + merges), split first by the regex that
`tokenizer.ggml.pre` names; "llama" is SentencePiece BPE (tokens, scores and token types), with
merges recovered from the scores and byte fallback, as transformers' LlamaTokenizer does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from llamarun.errors import CheckpointError, TokenizerError
from llamarun.tokenizer.base import Tokenizer
from llamarun.tokenizer.hf import HFTokenizer

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type / gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how llama.cpp (llama-vocab.cpp) splits text before BPE.
_GPT2_LIKE = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"})
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone",
                               "minerva-7b"})
_LLAMA3_LIKE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                          "smaug-bpe"})
_QWEN2_LIKE = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})
SUPPORTED_PRE = _GPT2_LIKE | _DIGITS_THEN_GPT2 | _LLAMA3_LIKE | _QWEN2_LIKE

# Control tokens llama.cpp also treats as end of generation when present (llama-vocab.cpp).
_EOG_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                        "<|endoftext|>", "<|end_of_text|>"})


def _metadata(path: Path) -> dict[str, Any]:
    from llamarun.loaders.gguf import gguf_metadata

    try:
        return gguf_metadata(Path(path))
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None


def gguf_chat_template(path: Path) -> str | None:
    """The GGUF's `tokenizer.chat_template` (a Jinja string), or None when it has none."""
    template = _metadata(path).get("tokenizer.chat_template")
    return template if isinstance(template, str) else None


def load_gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata."""
    return tokenizer_from_metadata(_metadata(path), source=str(path))


def tokenizer_from_metadata(md: dict[str, Any], *, source: str) -> HFTokenizer:
    """Build the tokenizer from already-read GGUF metadata (`source` names the file in errors)."""
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.model "
                             "or tokenizer.ggml.tokens missing)")
    n = len(tokens)
    types = _array(md, "tokenizer.ggml.token_type", n, source, default=NORMAL).astype(np.int64)
    if kind == "gpt2":
        tok = _byte_level_bpe(md, tokens, types, source)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(md, tokens, types, source)
        add_bos_default = True
    else:
        raise TokenizerError(f"{source}: tokenizer.ggml.model {kind!r} is not supported "
                             "(supported: gpt2, llama)")

    def token_id(key: str) -> int | None:
        value = md.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        value = int(value)
        if not 0 <= value < n:
            log.debug("%s: tokenizer.ggml.%s=%d is outside the vocabulary; ignored", source, key,
                      value)
            return None
        return value

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    stops = {i for i in (eos_id, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
    stops |= {i for i, t in enumerate(tokens) if types[i] == CONTROL and t in _EOG_TEXTS}
    add_bos = md.get("tokenizer.ggml.add_bos_token", add_bos_default)
    template = md.get("tokenizer.chat_template")
    return HFTokenizer(
        tok,
        bos_id=bos_id,
        eos_id=eos_id,
        stop_ids=stops,
        add_bos=bool(add_bos),
        chat_template=template if isinstance(template, str) else None,
        kind="gguf",
        source=source,
        pad_id=token_id("padding_token_id"),
    )


def _array(md: dict[str, Any], key: str, n: int, source: str, *, default: float) -> np.ndarray:
    value = md.get(key)
    if value is None:
        return np.full(n, default)
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise TokenizerError(f"{source}: {key} has {arr.size} entries, expected {n} (one per token)")
    return arr


def _vocab(tokens: Sequence[str], source: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            # BPE needs unique strings; llama.cpp keeps both, we can only reach the first.
            log.debug("%s: token %r appears twice (ids %d and %d)", source, t, vocab[t], i)
            continue
        vocab[t] = i
    return vocab


def _added_tokens(tok: tokenizers.Tokenizer, tokens: Sequence[str], types: np.ndarray) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens."""
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN))]
    plain = [AddedToken(tokens[i], special=False, normalized=False)
             for i in np.flatnonzero(types == USER_DEFINED)]
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)


def _pre_tokenizer(pre: str, source: str) -> pre_tokenizers.PreTokenizer:
    if pre in _GPT2_LIKE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:  # SmolLM's tokenizer.json: digits one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    split = _LLAMA3_SPLIT if pre in _LLAMA3_LIKE else _QWEN2_SPLIT if pre in _QWEN2_LIKE else None
    if split is None:
        raise TokenizerError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                             f"{', '.join(sorted(SUPPORTED_PRE))})")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _byte_level_bpe(md: dict[str, Any], tokens: Sequence[str], types: np.ndarray,
                    source: str) -> tokenizers.Tokenizer:
    merges_raw = md.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise TokenizerError(f"{source}: tokenizer.ggml.merges is missing (needed for gpt2 BPE)")
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise TokenizerError(f"{source}: tokenizer.ggml.merges entry {m!r} is not 'a b'")
        merges.append((left, right))
    pre = str(md.get("tokenizer.ggml.pre", "default"))
    # Llama 3's tokenizer.json (and llama.cpp for it) look whole words up before merging.
    model = models.BPE(_vocab(tokens, source), merges, ignore_merges=pre in _LLAMA3_LIKE)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    _added_tokens(tok, tokens, types)
    return tok


def _sentencepiece_bpe(md: dict[str, Any], tokens: Sequence[str], types: np.ndarray,
                       source: str) -> tokenizers.Tokenizer:
    scores = _array(md, "tokenizer.ggml.scores", len(tokens), source, default=0.0)
    vocab = _vocab(tokens, source)
    # SentencePiece BPE merges the adjacent pair whose result scores highest; as ranked merges
    # that is every split of each normal piece into two pieces, best-scoring result first.
    candidates: list[tuple[float, int, int, int, str, str]] = []
    for i in np.flatnonzero(types == NORMAL):
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                candidates.append((-float(scores[i]), i, vocab[left], vocab[right], left, right))
    candidates.sort(key=lambda c: c[:4])
    merges = [(c[4], c[5]) for c in candidates]
    unk = md.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None
    model = models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    _added_tokens(tok, tokens, types)
    return tok
