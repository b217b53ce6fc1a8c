"""Hugging Face `tokenizer.json` (+ tokenizer_config.json, generation_config.json) through `tokenizers`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from llamarun import files
from llamarun.errors import TokenizerError
from llamarun.tokenizer.base import Tokenizer, valid_text

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character table used by ByteLevel tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_types(node: Any) -> set[str]:
    """All decoder type names in a tokenizer.json decoder tree."""
    if not isinstance(node, dict):
        return set()
    found = {node["type"]} if isinstance(node.get("type"), str) else set()
    for child in node.get("decoders") or ():
        found |= _decoder_types(child)
    return found


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`; `decode` is `tok.decode(ids, skip_special_tokens=False)` (skips nothing)."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None = None,
        kind: str = "hf",
        source: str = "",
        pad_id: int | None = None,
    ) -> None:
        self._tok = tok
        # Built on first need: a copy that encodes special-token text as plain text (split_special_tokens).
        self._plain: tokenizers.Tokenizer | None = None
        self.kind = kind
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        stops = set(stop_ids)
        if eos_id is not None:
            stops.add(eos_id)
        self.stop_ids = frozenset(stops)
        self.add_bos = add_bos
        self.chat_template = chat_template
        added = tok.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in added.items()}
        self._control = {t.content: i for i, t in added.items() if t.special}
        # A special token matched after normalization (e.g. lowercasing) can hide in text that does
        # not spell it: then no text is known to be free of it without running the tokenizer.
        self._normalized_specials = any(t.special and t.normalized for t in added.values())
        types = _decoder_types(json.loads(tok.decoder.__getstate__())) if tok.decoder is not None else set()
        self._byte_level = "ByteLevel" in types
        self._byte_fallback = "ByteFallback" in types

    @classmethod
    def from_folder(cls, folder: Path, *, tokenizer_file: Path | None = None) -> HFTokenizer:
        """Build from an HF folder: tokenizer.json, tokenizer_config.json, generation_config.json, config.json."""
        path = tokenizer_file or folder / "tokenizer.json"
        text = files.read_text(path, what="tokenizer file", error=TokenizerError,
                               limit=files.MAX_TOKENIZER_BYTES)
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read {path}: {_first_line(e)}") from None
        tcfg = _read_json(folder / "tokenizer_config.json")
        gcfg = _read_json(folder / "generation_config.json")
        mcfg = _read_json(folder / "config.json")

        def token_id(key: str) -> int | None:
            value = tcfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found = tok.token_to_id(value)
                if found is None:
                    raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {key} {value!r} is not in the vocabulary")
                return found
            for cfg in (gcfg, mcfg):
                ids = _id_list(cfg.get(f"{key}_id"))
                if ids:
                    return ids[0]
            return None

        bos_id = token_id("bos_token")
        eos_id = token_id("eos_token")
        pad_id = token_id("pad_token")
        stop_ids = _id_list(gcfg.get("eos_token_id")) or _id_list(mcfg.get("eos_token_id"))
        try:
            chat_template = read_chat_template(folder)
        except TokenizerError:
            chat_template = None  # load_chat_format reports it when a chat needs it; completion does not
        add_bos = tcfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = _post_processor_adds(tok, bos_id)
        return cls(
            tok,
            bos_id=bos_id,
            eos_id=eos_id,
            stop_ids=stop_ids,
            add_bos=add_bos,
            chat_template=chat_template,
            source=str(path),
            pad_id=pad_id,
        )

    def encode(self, text: str, *, bos: bool, eos: bool = False) -> list[int]:
        """Encode without the post-processor; special-token text stays text; BOS/EOS only when asked."""
        text = valid_text(text)
        tok = self._tok
        if self._may_hold_special(text):
            if self._plain is None:
                self._plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
                self._plain.encode_special_tokens = True
            tok = self._plain
        return self._with_bos_eos(tok.encode(text, add_special_tokens=False).ids, bos=bos, eos=eos)

    def encode_with_special(self, text: str) -> list[int]:
        """Encode with added/special tokens recognised, without the post-processor (no BOS)."""
        return self._tok.encode(valid_text(text), add_special_tokens=False).ids

    def control_tokens(self) -> dict[str, int]:
        """The added tokens marked special, by their text."""
        return self._control

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """Cut where the tokenizer itself matches special tokens (its offsets), so its flags apply."""
        text = valid_text(text)
        if not self._may_hold_special(text):
            return [(text, None)] if text else []
        enc = self._tok.encode(text, add_special_tokens=False)
        pieces: list[tuple[str, int | None]] = []
        start = 0
        for i, (a, b) in zip(enc.ids, enc.offsets):
            if i not in self.control_ids or b <= start:
                continue
            a = max(a, start)
            if a > start:
                pieces.append((text[start:a], None))
            pieces.append((text[a:b], i))
            start = b
        if start < len(text):
            pieces.append((text[start:], None))
        return pieces

    def _may_hold_special(self, text: str) -> bool:
        pattern = self._control_pattern
        return pattern is not None and (self._normalized_specials or pattern.search(text) is not None)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode with the tokenizer.json decoder, keeping special tokens (transformers' default)."""
        self._check_ids(ids)
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes: ByteLevel pieces mapped back to bytes, `<0xNN>` as one byte, `▁` as a space."""
        token = self._tok.id_to_token(id)
        if token is None:
            raise TokenizerError(f"token id {id} is out of range for vocabulary size {self.vocab_size}")
        if token in self._added:
            return token.encode()
        if self._byte_level:
            return bytes(_BYTE_DECODER[c] for c in token if c in _BYTE_DECODER)
        if self._byte_fallback and _BYTE_PIECE.fullmatch(token):
            return bytes([int(token[3:5], 16)])
        return token.replace(_SPACE, " ").encode()

    def is_byte_run_token(self, id: int) -> bool:
        """True for `<0xNN>` pieces when the decoder has ByteFallback (it resolves a run all at once)."""
        if not self._byte_fallback:
            return False
        token = self._tok.id_to_token(id)
        return token is not None and token not in self._added and bool(_BYTE_PIECE.fullmatch(token))

    def piece(self, id: int) -> str:
        """The vocabulary entry, e.g. "▁Hello", "Ġworld" or "<|eot_id|>"."""
        token = self._tok.id_to_token(id)
        if token is None:
            raise TokenizerError(f"token id {id} is out of range for vocabulary size {self.vocab_size}")
        return token

    def special_id(self, text: str) -> int | None:
        """Id of an added token spelled `text`."""
        return self._added.get(text)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok


def read_chat_template(folder: Path) -> str | None:
    """The folder's chat template: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    found = find_chat_template(folder)
    return found[0] if found is not None else None


def find_chat_template(folder: Path) -> tuple[str, str] | None:
    """(template, the file it came from) for the folder's chat template, or None."""
    jinja_file = folder / "chat_template.jinja"
    if os.path.lexists(jinja_file):
        return files.read_text(jinja_file, what="chat template", error=TokenizerError,
                               limit=files.MAX_TEMPLATE_BYTES), str(jinja_file)
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _read_json(folder / name).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            if len(template) > files.MAX_TEMPLATE_BYTES:
                raise TokenizerError(f"{folder / name}: the chat template is longer than "
                                     f"{files.MAX_TEMPLATE_BYTES >> 20} MiB")
            return template, str(folder / name)
    return None


def read_stop_ids(folder: Path) -> list[int]:
    """`eos_token_id` (int or list) from generation_config.json, else config.json."""
    return _id_list(_read_json(folder / "generation_config.json").get("eos_token_id")) or _id_list(
        _read_json(folder / "config.json").get("eos_token_id")
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A side file's JSON object ({} when the folder has none), through the one JSON reader."""
    return files.read_json(path, what="JSON file", error=TokenizerError, missing_ok=True) or {}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _post_processor_adds(tok: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """Whether the post-processor puts BOS in front of a single sequence."""
    if bos_id is None:
        return False
    with_special = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    return len(with_special) > len(plain) and with_special[0] == bos_id
