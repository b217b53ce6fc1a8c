"""Meta's Llama 3 tiktoken tokenizer against tiktoken (recorded pattern) and transformers' conversion."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from fixtures_util import require_fixture
from llamarun.tokenizer import detect_tokenizer_kind, load_tokenizer
from llamarun.tokenizer.tiktoken_bpe import TiktokenTokenizer
from tokenizer_corpus import CORPUS


def _spec() -> dict[str, Any]:
    return json.loads(require_fixture("llama3-tokenizer", "special_tokens.json").read_text())


@lru_cache(maxsize=1)
def _loaded() -> tuple[TiktokenTokenizer, tiktoken.Encoding, dict[str, Any]]:
    spec = _spec()
    path = require_fixture("llama3-tokenizer", "tokenizer.model")
    conv = spec["conventions"]["llama3.1+"]
    ref = tiktoken.Encoding(
        name="ref",
        pat_str=spec["pat_str"],
        mergeable_ranks=load_tiktoken_bpe(str(path)),
        special_tokens={name: i for name, i in conv["special_tokens"]},
    )
    tok = load_tokenizer(path.parent)
    assert isinstance(tok, TiktokenTokenizer)
    return tok, ref, spec


@pytest.fixture(scope="module")
def llama3() -> tuple[TiktokenTokenizer, tiktoken.Encoding, dict[str, Any]]:
    require_fixture("llama3-tokenizer", "tokenizer.model")
    return _loaded()


def test_special_tokens_and_stop_ids(llama3: Any) -> None:
    tok, _, spec = llama3
    conv = spec["conventions"]["llama3.1+"]
    assert [[name, i] for name, i in tok.special_tokens.items()] == conv["special_tokens"]
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (conv["bos_id"], conv["eos_id"], conv["pad_id"])
    assert tok.stop_ids == frozenset(conv["stop_token_ids"])
    assert tok.special_id("<|eot_id|>") == 128009
    assert tok.special_id("<|python_tag|>") == 128010
    assert tok.special_id("<|not_a_token|>") is None
    assert tok.add_bos


def test_recorded_checks(llama3: Any) -> None:
    tok, _, spec = llama3
    for check in spec["checks"]:
        ids = tok.encode(check["text"], bos=check["bos"], eos=check["eos"])
        assert ids == check["ids"]
        if "decoded" in check:
            assert tok.decode(ids) == check["decoded"]


def test_encode_matches_tiktoken(llama3: Any) -> None:
    tok, ref, _ = llama3
    for text in CORPUS:
        expected = ref.encode(text, disallowed_special=())
        assert tok.encode(text, bos=False) == expected, text
        assert tok.encode(text, bos=True, eos=True) == [128000, *expected, 128001], text
        assert tok.encode_with_special(text) == ref.encode(text, allowed_special="all"), text
        assert tok.decode(expected) == ref.decode(expected) == text


def test_encode_matches_transformers(llama3: Any) -> None:
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok, _, spec = llama3
    names = [name for name, _ in spec["conventions"]["llama3.1+"]["special_tokens"]]
    backend = TikTokenConverter(
        vocab_file=str(require_fixture("llama3-tokenizer", "tokenizer.model")),
        pattern=spec["pat_str"],
        extra_special_tokens=names,
    ).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    for text in CORPUS:
        assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False, split_special_tokens=True), text
        assert tok.encode_with_special(text) == hf.encode(text, add_special_tokens=False), text


def test_special_text_in_user_input_stays_text(llama3: Any) -> None:
    tok, _, _ = llama3
    ids = tok.encode("<|begin_of_text|><|eot_id|> hi", bos=False)
    assert all(i < 128000 for i in ids)
    assert tok.encode_with_special("<|eot_id|>") == [128009]


def test_long_inputs_are_split_like_meta(llama3: Any) -> None:
    tok, ref, _ = llama3
    # One 30k run of non-whitespace is cut at 25k characters before BPE.
    text = "a" * 30_000
    assert tok.encode(text, bos=False) == ref.encode("a" * 25_000) + ref.encode("a" * 5_000)
    # Whitespace runs too.
    spaces = " " * 26_000 + "x"
    assert tok.encode(spaces, bos=False) == ref.encode(" " * 25_000) + ref.encode(" " * 1_000 + "x")
    # Texts over 400k characters are windowed; mixed text round-trips.
    big = ("word " * 90_000)[:450_000]
    ids = tok.encode(big, bos=False)
    assert tok.decode(ids) == big
    assert ids == ref.encode(big[:400_000]) + ref.encode(big[400_000:])


def test_pieces_and_bytes(llama3: Any) -> None:
    tok, ref, _ = llama3
    assert tok.piece(9906) == "Hello"
    assert tok.token_bytes(128009) == b"<|eot_id|>"
    assert tok.piece(128009) == "<|eot_id|>"
    partial = next(i for i in range(256) if ref.decode_single_token_bytes(i) == b"\xe2")
    assert tok.piece(partial) == "\\xe2"
    for i in ref.encode("€ 你好 👨‍👩‍👧"):
        assert tok.token_bytes(i) == ref.decode_single_token_bytes(i)


def test_detected_by_content(tmp_path: Path) -> None:
    src = require_fixture("llama3-tokenizer", "tokenizer.model")
    folder = tmp_path / "llama-2-7b"  # a misleading name
    folder.mkdir()
    shutil.copy(src, folder / "tokenizer.model")
    assert detect_tokenizer_kind(folder / "tokenizer.model") == "tiktoken"
    assert load_tokenizer(folder).kind == "tiktoken"
