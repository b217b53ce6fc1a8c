"""Message contents stay text: special-token text typed into a message never becomes a control token.

A chat template is rendered with every control-token text inside a message content (and any piece
of one at a content's edges, which a neighbour could complete) swapped for a marker. The template's
own text is then encoded with special tokens allowed and the marked spans as plain text, as Meta's
Llama 3 reference encodes content with special tokens disallowed. When nothing in the contents
spells a control token, the ids are exactly those of encoding the rendered text at once
(transformers' `apply_chat_template(..., tokenize=True)`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llamarun.errors import TokenizerError
from llamarun.tokenizer.base import Tokenizer

# Plane 16 private-use characters: no tokenizer, template filter or case mapping touches them.
_SENTINELS = range(0x10FFFD, 0x10EFFD, -1)


@dataclass(frozen=True)
class Marks:
    """The markers put into one rendering: `sentinel + index + sentinel` stands for `texts[index]`."""

    sentinel: str
    texts: tuple[str, ...]

    def parts(self, text: str) -> list[tuple[str, bool]]:
        """`text` as (piece, is_content) pairs, markers replaced by the text they stand for."""
        if not self.texts or self.sentinel not in text:
            return [(text, False)] if text else []
        s = re.escape(self.sentinel)
        out: list[tuple[str, bool]] = []
        start = 0
        for m in re.finditer(f"{s}([0-9]+){s}", text):
            k = int(m.group(1))
            if k >= len(self.texts):
                continue  # not one of ours (a template can spell the sentinel): leave it as text
            if m.start() > start:
                out.append((text[start : m.start()], False))
            out.append((self.texts[k], True))
            start = m.end()
        if start < len(text):
            out.append((text[start:], False))
        return out


class ContentGuard:
    """Marks control-token text in messages, and encodes rendered text with the marked spans as text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        texts = list(tokenizer.control_tokens())
        # Proper prefixes/suffixes: a content ending in "<|im_" and a neighbour starting "end|>".
        self._prefixes = frozenset(t[:i] for t in texts for i in range(1, len(t)))
        self._suffixes = frozenset(t[i:] for t in texts for i in range(1, len(t)))
        self._longest = max(map(len, texts), default=0)

    def mark(self, messages: Iterable[Mapping[str, object]], *, template: str) -> tuple[list[dict[str, object]], Marks]:
        """Copies of `messages` with marked contents, and the marks (`template` is searched for a free sentinel)."""
        messages = [dict(m) for m in messages]
        sentinel = _free_sentinel([template, *(str(v) for m in messages for v in m.values())])
        texts: list[str] = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str) and content:
                m["content"] = self._mark(content, sentinel, texts)
        return messages, Marks(sentinel, tuple(texts))

    def _mark(self, text: str, sentinel: str, texts: list[str]) -> str:
        spans: list[tuple[int, int]] = []
        at = 0
        for piece, special in self.tokenizer.split_special(text):
            if special is not None:
                spans.append((at, at + len(piece)))
            at += len(piece)
        head = len(text) - len(text.lstrip())
        tail = len(text.rstrip())
        for n in range(min(self._longest - 1, tail - head), 0, -1):
            if text[head : head + n] in self._suffixes:
                spans.append((head, head + n))
                break
        for n in range(min(self._longest - 1, tail - head), 0, -1):
            if text[tail - n : tail] in self._prefixes:
                spans.append((tail - n, tail))
                break
        if not spans:
            return text
        out: list[str] = []
        start = 0
        for a, b in _union(spans):
            out.append(text[start:a])
            out.append(f"{sentinel}{len(texts)}{sentinel}")
            texts.append(text[a:b])
            start = b
        out.append(text[start:])
        return "".join(out)

    def encode(self, text: str, marks: Marks) -> list[int]:
        """Token ids of rendered `text`: its own control-token text as control ids, marked spans as text."""
        tok = self.tokenizer
        parts = marks.parts(text)
        if not any(is_content for _, is_content in parts):
            return tok.encode_with_special(text)
        # Usually the marks only cut harmless pieces ("<" at a content's end): then the whole text,
        # encoded at once, holds exactly the template's control ids, and those ids are the answer.
        ids = tok.encode_with_special("".join(piece for piece, _ in parts))
        own = [i for piece, is_content in parts if not is_content for _, i in tok.split_special(piece) if i is not None]
        if [i for i in ids if i in tok.control_ids] == own:
            return ids
        pieces: list[str | int] = []
        for piece, is_content in parts:
            split = [(piece, None)] if is_content else tok.split_special(piece)
            for text_piece, special in split:
                if special is not None:
                    pieces.append(special)
                elif pieces and isinstance(pieces[-1], str):
                    pieces[-1] += text_piece
                else:
                    pieces.append(text_piece)
        out: list[int] = []
        for p in pieces:
            if isinstance(p, int):
                out.append(p)
            else:
                out.extend(tok.encode(p, bos=False))
        return out


def _free_sentinel(strings: list[str]) -> str:
    first = chr(_SENTINELS[0])
    if not any(first in s for s in strings):
        return first
    used = {c for s in strings for c in s if ord(c) >= _SENTINELS[-1]}
    for code in _SENTINELS:
        if chr(code) not in used:
            return chr(code)
    raise TokenizerError("the messages use every private-use character llamarun could mark special-token text with")


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
