"""Streaming detokenizer: token ids in, printable text deltas out.

The decoder never cuts a UTF-8 character or a byte run in two: ids wait in `_pending` until their bytes
end on a character boundary, then the pending ids are decoded with the tokenizer's own `decode`
behind an "anchor" token (so start-of-text rules such as SentencePiece's leading-space removal apply
only at the real start). Text that could be the beginning of a stop string is held back.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from llamarun.tokenizer.base import Tokenizer


class StreamDecoder:
    """Incremental decoder whose deltas concatenate to `tokenizer.decode(all ids)` (cut at a stop string)."""

    def __init__(self, tokenizer: Tokenizer, *, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.stopped = False
        self.text = ""
        self._pending: list[int] = []
        self._at_start = True  # nothing visible decoded yet: decode pending ids as the start of the text
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text that may be the start of a stop string
        self._anchor, self._anchor_text = _find_anchor(tokenizer)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final (may be "")."""
        if self.stopped:
            return ""
        self._pending.append(token_id)
        self._utf8.decode(self.tokenizer.token_bytes(token_id))
        if self.tokenizer.is_byte_run_token(token_id) or self._utf8.getstate()[0]:
            return ""  # inside a character or a byte run: more ids may change how these decode
        text = self._decode_pending()
        if self._at_start and not text:
            return ""
        self._at_start = False
        self._pending.clear()
        return self._emit(text)

    def flush(self) -> str:
        """Release everything: pending ids (decoded as the reference would) and held-back text."""
        if self.stopped:
            return ""
        out = ""
        if self._pending:
            text = self._decode_pending()
            self._pending.clear()
            self._utf8.reset()
            out = self._emit(text)
        if not self.stopped:
            out += self._held
            self.text += self._held
            self._held = ""
        return out

    def _decode_pending(self) -> str:
        if self._at_start:
            return self.tokenizer.decode(self._pending)
        full = self.tokenizer.decode([self._anchor, *self._pending])
        assert full.startswith(self._anchor_text), (full, self._anchor_text)
        return full[len(self._anchor_text) :]

    def _emit(self, text: str) -> str:
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out = buf[: min(hits)]
            self.stopped = True
            self._held = ""
        else:
            keep = self._partial_stop_len(buf)
            out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.text += out
        return out

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best


def _find_anchor(tokenizer: Tokenizer) -> tuple[int, str]:
    """A plain token that decodes to visible ASCII text on its own and ends no byte run."""
    for probe in ("a", "x", "A", "0", "."):
        ids = tokenizer.encode(probe, bos=False)
        if len(ids) == 1:
            text = tokenizer.decode(ids)
            if text and text.isascii() and not text[-1].isspace() and not tokenizer.is_byte_run_token(ids[0]):
                return ids[0], text
    # Fall back to any id whose decode is non-empty printable ASCII.
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i])
        if text.strip() and text.isascii() and text.isprintable() and not tokenizer.is_byte_run_token(i):
            return i, text
    raise AssertionError(f"no anchor token in {tokenizer!r}")
