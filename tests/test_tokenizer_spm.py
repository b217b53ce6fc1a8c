"""SentencePiece tokenizers (Llama 2, stories260K) against `sentencepiece` itself, on the shared corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from fixtures_util import require_fixture
from llamarun.errors import TokenizerError
from llamarun.tokenizer import detect_tokenizer_kind, load_tokenizer
from llamarun.tokenizer.spm import SentencePieceTokenizer
from tokenizer_corpus import CORPUS

SPM_FILES = [("llama2-tokenizer", "tokenizer.model"), ("stories260K", "meta", "tokenizer.model")]


@pytest.fixture(params=SPM_FILES, ids=["llama2", "stories260K"], scope="module")
def spm_path(request: pytest.FixtureRequest) -> Path:
    return require_fixture(*request.param)


def test_encode_matches_sentencepiece(spm_path: Path) -> None:
    tok = load_tokenizer(spm_path)
    ref = spm.SentencePieceProcessor(model_file=str(spm_path))
    assert tok.kind == "sentencepiece"
    for text in CORPUS:
        expected = ref.encode(text)
        assert tok.encode(text, bos=False) == expected, text
        assert tok.encode(text, bos=True, eos=True) == [ref.bos_id(), *expected, ref.eos_id()], text
        assert tok.decode(expected) == ref.decode(expected), text


def test_llama2_known_ids() -> None:
    tok = load_tokenizer(require_fixture("llama2-tokenizer"))
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, None)
    assert tok.stop_ids == frozenset({2})
    assert tok.add_bos
    assert tok.piece(15043) == "▁Hello"
    assert tok.special_id("</s>") == 2


def test_stories_known_ids() -> None:
    tok = load_tokenizer(require_fixture("stories260K", "meta"))
    assert tok.encode("Once upon a time", bos=True) == [1, 403, 407, 261, 378]
    assert tok.vocab_size == 512


def test_special_text_in_user_input_stays_text(spm_path: Path) -> None:
    tok = load_tokenizer(spm_path)
    ids = tok.encode("a <s> b </s>", bos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.encode_with_special("<s>a</s>") == [tok.bos_id, *tok.encode("a", bos=False), tok.eos_id]


def test_token_bytes(spm_path: Path) -> None:
    tok = load_tokenizer(spm_path)
    ref = spm.SentencePieceProcessor(model_file=str(spm_path))
    assert tok.token_bytes(ref.piece_to_id("<0xE2>")) == b"\xe2"
    assert tok.token_bytes(tok.bos_id) == b""
    ids = ref.encode("tiny cat")
    assert b"".join(tok.token_bytes(i) for i in ids) == b" tiny cat"


def test_detected_by_content_not_name(tmp_path: Path) -> None:
    src = require_fixture("llama2-tokenizer", "tokenizer.model")
    folder = tmp_path / "Meta-Llama-3-8B"  # a misleading folder name
    folder.mkdir()
    shutil.copy(src, folder / "tokenizer.model")
    assert detect_tokenizer_kind(folder / "tokenizer.model") == "sentencepiece"
    assert isinstance(load_tokenizer(folder), SentencePieceTokenizer)


def test_generation_config_adds_stop_ids(tmp_path: Path) -> None:
    shutil.copy(require_fixture("stories260K", "meta", "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 13]}')
    assert load_tokenizer(tmp_path).stop_ids == frozenset({2, 13})


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(junk)
    junk.write_bytes(b"\x0a\x05garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(junk)
    tok = load_tokenizer(require_fixture("stories260K", "meta"))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([512])
