"""SentencePiece `tokenizer.model` (Llama 1, Llama 2, Code Llama, llama2.c models) through `sentencepiece`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from llamarun import files
from llamarun.errors import TokenizerError
from llamarun.tokenizer.base import Tokenizer, valid_text

_SPACE = "\u2581"  # SentencePiece's whitespace symbol


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; `decode` is `SentencePieceProcessor.decode`, which drops control ids (<s>, </s>)."""

    kind = "sentencepiece"

    def __init__(self, path: Path, *, extra_stop_ids: Iterable[int] = ()) -> None:
        self.source = str(path)
        try:
            self._load(path, extra_stop_ids)
        except (OSError, RuntimeError, UnicodeDecodeError, ValueError) as e:
            # A corrupt model can fail anywhere in the library, pieces that are not UTF-8 too.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"cannot read SentencePiece model {path}: {first}") from None

    def _load(self, path: Path, extra_stop_ids: Iterable[int]) -> None:
        proto = files.read_bytes(path, what="SentencePiece model", error=TokenizerError,
                                 limit=files.MAX_TOKENIZER_BYTES)
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = _id_or_none(self._sp.bos_id())
        self.eos_id = _id_or_none(self._sp.eos_id())
        self.pad_id = _id_or_none(self._sp.pad_id())
        stops = {i for i in extra_stop_ids if 0 <= i < self.vocab_size}
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_ids = frozenset(stops)
        self.add_bos = True
        # Control and user-defined pieces ("<s>", "</s>", ...) are the special-token texts.
        self._specials = {
            self._sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        self._unk_surface = self._sp.decode([self._sp.unk_id()]).encode() if self._sp.unk_id() >= 0 else b""

    def encode(self, text: str, *, bos: bool, eos: bool = False) -> list[int]:
        """Encode as `sp.encode` (which never treats "<s>" in text as a control token)."""
        return self._with_bos_eos(self._sp.encode(valid_text(text)), bos=bos, eos=eos)

    def encode_with_special(self, text: str) -> list[int]:
        """Split on control-piece texts ("<s>", "</s>"), encode the segments in between."""
        text = valid_text(text)
        ids: list[int] = []
        for piece, special in self.split_special(text):
            if special is None:
                ids.extend(self._sp.encode(piece))
            else:
                ids.append(special)
        return ids

    def control_tokens(self) -> dict[str, int]:
        """Control and unknown pieces ("<s>", "</s>", "<unk>") by their text."""
        return self._specials

    def decode(self, ids: Sequence[int]) -> str:
        """Decode with SentencePiece: control ids give "", invalid byte runs give one U+FFFD per byte."""
        self._check_ids(ids)
        return self._sp.decode(list(ids))

    def token_bytes(self, id: int) -> bytes:
        """Bytes of the piece with `▁` as a space, kept even at the start of text; control ids give b""."""
        if self._sp.is_control(id):
            return b""
        if self._sp.is_unknown(id):
            return self._unk_surface
        if self._sp.is_byte(id):
            return bytes([int(self._sp.id_to_piece(id)[3:5], 16)])
        return self._sp.id_to_piece(id).replace(_SPACE, " ").encode()

    def piece(self, id: int) -> str:
        """The SentencePiece piece, e.g. "▁Hello" or "<0xE2>"."""
        return self._sp.id_to_piece(id)

    def special_id(self, text: str) -> int | None:
        """Id of a control piece such as "<s>" or "</s>"."""
        return self._specials.get(text)


def _id_or_none(i: int) -> int | None:
    return i if i >= 0 else None
