"""tokenizer.json tokenizers against transformers' AutoTokenizer on folders made from the shared fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from fixtures_util import fixtures_dir, require_fixture
from llamarun.tokenizer import load_tokenizer
from llamarun.tokenizer.hf import HFTokenizer
from tokenizer_corpus import CORPUS, make_hf_folder, make_llama3_hf_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def stories_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("stories_hf"), require_fixture("stories260K", "hf"))


@pytest.fixture(scope="module")
def llama3_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_fixture("llama3-tokenizer", "tokenizer.model")
    return make_llama3_hf_folder(tmp_path_factory.mktemp("llama3_hf"), fixtures_dir())


def _compare_with_auto(folder: Path, corpus: list[str]) -> None:
    tok = load_tokenizer(folder)
    ref: Any = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.kind == "hf"
    assert tok.vocab_size == len(ref)
    for text in corpus:
        plain = ref.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tok.encode(text, bos=False) == plain, text
        assert tok.encode(text, bos=tok.add_bos) == ref.encode(text, split_special_tokens=True), text
        special = ref.encode(text, add_special_tokens=False)
        assert tok.encode_with_special(text) == special, text
        assert tok.decode(special) == ref.decode(special), text


def test_stories_hf_matches_transformers(stories_hf: Path) -> None:
    _compare_with_auto(stories_hf, CORPUS)


def test_llama3_hf_matches_transformers(llama3_hf: Path) -> None:
    _compare_with_auto(llama3_hf, CORPUS)


@pytest.fixture(scope="module")
def llama3_hf_tok(llama3_hf: Path) -> Any:
    return load_tokenizer(llama3_hf)


def test_llama3_hf_matches_meta_tiktoken(llama3_hf_tok: Any) -> None:
    hf = llama3_hf_tok
    meta = load_tokenizer(require_fixture("llama3-tokenizer"))
    for text in CORPUS:
        assert hf.encode(text, bos=True) == meta.encode(text, bos=True), text
        assert hf.encode_with_special(text) == meta.encode_with_special(text), text
    ids = meta.encode("héllo 👨‍👩‍👧 <|eot_id|>", bos=True)
    assert hf.decode(ids) == meta.decode(ids)
    assert [hf.token_bytes(i) for i in ids] == [meta.token_bytes(i) for i in ids]


def test_llama3_hf_special_ids(llama3_hf_tok: Any) -> None:
    tok = llama3_hf_tok
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128009, None)
    assert tok.stop_ids == frozenset({128001, 128008, 128009})
    assert tok.add_bos  # from the TemplateProcessing post-processor
    assert tok.special_id("<|start_header_id|>") == 128006
    assert tok.chat_template is not None


def test_stories_hf_settings(stories_hf: Path) -> None:
    tok = load_tokenizer(stories_hf)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids, tok.add_bos) == (512, 1, 2, frozenset({2}), True)
    assert tok.encode("Once upon a time", bos=True) == [1, 403, 407, 261, 378]
    assert tok.piece(403) == "▁Once"
    assert tok.token_bytes(403) == b" Once"
    assert tok.token_bytes(3 + 0xE2) == b"\xe2" and tok.is_byte_run_token(3 + 0xE2)
    # tokenizer.json is preferred over tokenizer.model when a folder has both.
    assert load_tokenizer(require_fixture("stories260K", "hf")).kind == "hf"


def test_add_bos_token_false_is_respected(tmp_path: Path) -> None:
    folder = make_hf_folder(tmp_path, require_fixture("stories260K", "hf"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(folder)
    assert not tok.add_bos
    assert tok.encode("hi", bos=True)[0] == 1  # the explicit switch still wins


def test_transformers5_llama_class_agrees_without_extra_whitespace() -> None:
    # transformers 5 rebuilds LlamaTokenizer's pipeline (Metaspace) instead of using tokenizer.json's
    # normalizer; the two agree except on leading spaces and runs of spaces.
    folder = require_fixture("stories260K", "hf")
    tok = load_tokenizer(folder)
    ref: Any = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = [t for t in CORPUS if "  " not in t and not t.startswith((" ", "\u3000", "\u00a0", "\u2581")) and t.strip() == t]
    assert len(texts) > 200
    for text in texts:
        assert tok.encode(text, bos=True) == ref.encode(text, split_special_tokens=True), text


def test_wraps_a_prebuilt_tokenizer() -> None:
    # How the GGUF loader uses it: a tokenizers.Tokenizer built elsewhere plus ids from metadata.
    backend = tokenizers.Tokenizer.from_file(str(require_fixture("stories260K", "hf", "tokenizer.json")))
    tok = HFTokenizer(backend, bos_id=1, eos_id=2, stop_ids=[2], add_bos=True, chat_template="{{ x }}", kind="gguf-llama", source="m.gguf")
    assert tok.kind == "gguf-llama" and tok.chat_template == "{{ x }}"
    assert tok.encode("Once upon a time", bos=True) == [1, 403, 407, 261, 378]
    assert tok.decode([1, 403, 407]) == "<s> Once upon"
    assert tok.backend is backend


def test_tokenizer_json_given_as_file(tmp_path: Path) -> None:
    shutil.copy(require_fixture("stories260K", "hf", "tokenizer.json"), tmp_path / "vocab-file.json")
    tok = load_tokenizer(tmp_path / "vocab-file.json")
    assert tok.kind == "hf" and tok.bos_id is None and not tok.add_bos
