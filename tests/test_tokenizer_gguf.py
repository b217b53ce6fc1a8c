"""Tokenizers and chat templates from GGUF metadata, against transformers, sentencepiece and tiktoken."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT

from fixtures_util import require_fixture, require_default_model
from gguf_util import tensor_types, write_llama_gguf
from llamarun.config import ModelArgs, read_json
from llamarun.errors import TokenizerError
from llamarun.tokenizer import load_chat_format, load_tokenizer
from llamarun.tokenizer.chat import HFTemplateChatFormat
from llamarun.tokenizer.gguf import gguf_chat_template, load_gguf_tokenizer
from llamarun.tokenizer.hf import HFTokenizer
from tokenizer_corpus import build_corpus

CORPUS = build_corpus(600, seed=7)

DIALOGS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "user", "content": "Write a haiku about GGUF files."},
        {"role": "assistant", "content": "Tensors packed in blocks,\nfour bits each."},
        {"role": "user", "content": "Now one in français, s'il vous plaît 😀"},
    ],
    [{"role": "user", "content": "  leading spaces and <|im_end|> inside, 2024-11-27  "}],
]


def _has_number(s: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in s)


# ---- SmolLM2 (gpt2 byte-level BPE, pre-tokenizer "smollm") against transformers ----

@pytest.fixture(scope="module")
def smollm2() -> Path:
    return require_default_model()


@pytest.fixture(scope="module")
def smollm2_tok(smollm2: Path) -> HFTokenizer:
    tok = load_gguf_tokenizer(smollm2)
    assert isinstance(tok, HFTokenizer)
    return tok


@pytest.fixture(scope="module")
def hf_smollm2_tok(smollm2: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def hf_smollm2_tok_digits(hf_smollm2_tok: Any) -> Any:
    """transformers' GGUF tokenizer with llama.cpp's `smollm` pre-tokenizer put in.

    transformers maps `tokenizer.ggml.pre` "smollm" to nothing and keeps GPT-2's plain ByteLevel
    split. llama.cpp (llama-vocab.cpp, the STARCODER/SMOLLM group) and SmolLM2's own tokenizer.json
    first isolate every \\p{N} character, then apply GPT-2's regex; so transformers' GGUF tokenizer
    differs from the model's real one on text with digits (e.g. "\\r\\n0", " \\n1", "Ⅻ").
    """
    import copy

    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(hf_smollm2_tok)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


def test_smollm2_special_ids(smollm2_tok: HFTokenizer, smollm2: Path) -> None:
    tok = smollm2_tok
    assert tok.kind == "gguf" and tok.source == str(smollm2)
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.piece(1) == "<|im_start|>" and tok.piece(2) == "<|im_end|>"
    assert tok.stop_ids == frozenset({2, 0})  # eos <|im_end|>, and <|endoftext|> as llama.cpp does
    assert not tok.add_bos
    assert tok.special_id("<|im_end|>") == 2
    assert [tok.piece(i) for i in tok.encode("12345", bos=False)] == list("12345")


def test_smollm2_ids_match_transformers_on_text_without_digits(smollm2_tok, hf_smollm2_tok) -> None:
    texts = [s for s in CORPUS if not _has_number(s)]
    assert len(texts) > 250
    for s in texts:
        assert smollm2_tok.encode(s, bos=False) == hf_smollm2_tok(
            s, add_special_tokens=False, split_special_tokens=True)["input_ids"], repr(s)
        assert smollm2_tok.encode_with_special(s) == hf_smollm2_tok(
            s, add_special_tokens=False)["input_ids"], repr(s)


def test_smollm2_ids_match_transformers_with_the_smollm_pre_tokenizer(smollm2_tok,
                                                                      hf_smollm2_tok_digits) -> None:
    assert len(CORPUS) > 500
    for s in CORPUS:
        assert smollm2_tok.encode(s, bos=False) == hf_smollm2_tok_digits(
            s, add_special_tokens=False, split_special_tokens=True)["input_ids"], repr(s)
        assert smollm2_tok.encode_with_special(s) == hf_smollm2_tok_digits(
            s, add_special_tokens=False)["input_ids"], repr(s)


def test_smollm2_decode_round_trips(smollm2_tok) -> None:
    for s in CORPUS:
        ids = smollm2_tok.encode(s, bos=False)
        assert smollm2_tok.decode(ids) == s
        assert b"".join(smollm2_tok.token_bytes(i) for i in ids) == s.encode()


def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_tok, hf_smollm2_tok_digits) -> None:
    template = gguf_chat_template(smollm2)
    assert template is not None and "<|im_start|>" in template
    assert smollm2_tok.chat_template == template
    fmt = load_chat_format(smollm2_tok)
    assert isinstance(fmt, HFTemplateChatFormat)
    for dialog in DIALOGS:
        for gen in (True, False):
            want = hf_smollm2_tok_digits.apply_chat_template(dialog, tokenize=False,
                                                             add_generation_prompt=gen)
            assert fmt.render(dialog, add_generation_prompt=gen) == want
            ids = hf_smollm2_tok_digits(want, add_special_tokens=False)["input_ids"]
            if dialog is DIALOGS[3]:  # "<|im_end|>" typed in a message stays text (test_chat_injection.py)
                im_end = smollm2_tok.special_id("<|im_end|>")
                assert ids.count(im_end) - fmt.encode_dialog(dialog, add_generation_prompt=gen).count(im_end) == 1
            else:
                assert fmt.encode_dialog(dialog, add_generation_prompt=gen) == ids


def test_load_tokenizer_dispatches_gguf(smollm2: Path) -> None:
    tok = load_tokenizer(smollm2)
    assert tok.kind == "gguf" and tok.encode("Hello world", bos=False) == [19556, 905]


# ---- SentencePiece-style ("llama") GGUF from stories260K's tokenizer.model ----

@pytest.fixture(scope="module")
def stories_spm_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = require_fixture("stories260K", "meta")
    sd = torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True)
    args = ModelArgs.from_params(read_json(folder / "params.json"))
    path = tmp_path_factory.mktemp("spm") / "stories.gguf"
    write_llama_gguf(path, sd, args, tensor_types(sd, QT.F32), spm_model=folder / "tokenizer.model",
                     chat_template=CHATML)
    return path, folder / "tokenizer.model"


CHATML = ("{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}"
          "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant: ' }}{% endif %}")


def test_spm_gguf_matches_sentencepiece(stories_spm_gguf) -> None:
    import sentencepiece as spm

    path, model_file = stories_spm_gguf
    tok = load_gguf_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (512, 1, 2, True)
    assert tok.stop_ids == frozenset({2})
    assert tok.encode("Once upon a time", bos=True) == [1, 403, 407, 261, 378]
    # SentencePiece's remove_extra_whitespaces (on in tok512) drops leading, trailing and repeated
    # spaces; llama.cpp and transformers keep them, so only text it leaves alone is compared.
    # A literal "▁" in the input is another SentencePiece-only special case.
    texts = [s for s in CORPUS if not re.search(r"^ | $|  |\u2581", s)]
    assert len(texts) > 150
    for s in texts:
        assert tok.encode(s, bos=False) == sp.encode(s), repr(s)
    for s in CORPUS:
        if "\u2581" not in s:
            ids = sp.encode(s)
            assert tok.decode(ids) == sp.decode(ids), repr(s)


def test_spm_gguf_matches_transformers_everywhere(stories_spm_gguf) -> None:
    transformers = pytest.importorskip("transformers")
    path, _ = stories_spm_gguf
    tok = load_gguf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for s in CORPUS:
        assert tok.encode(s, bos=False) == ref(s, add_special_tokens=False,
                                               split_special_tokens=True)["input_ids"], repr(s)
        assert tok.encode_with_special(s) == ref(s, add_special_tokens=False)["input_ids"], repr(s)
    dialog = DIALOGS[2]
    assert load_chat_format(tok).render(dialog) == ref.apply_chat_template(
        dialog, tokenize=False, add_generation_prompt=True)


# ---- Llama 3 style GGUF (gpt2 BPE, pre "llama-bpe") against tiktoken ----

@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tokenizer-only GGUF written the way llama.cpp's converter writes Llama 3's vocabulary."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from tokenizer_corpus import make_llama3_hf_folder

    fixtures = require_fixture("llama3-tokenizer").parent
    spec = json.loads((fixtures / "llama3-tokenizer" / "special_tokens.json").read_text())
    specials = dict(spec["conventions"]["llama3.1+"]["special_tokens"])
    tmp = tmp_path_factory.mktemp("llama3")
    data = json.loads((make_llama3_hf_folder(tmp / "hf", fixtures) / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [""] * (len(vocab) + len(specials))
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for t, i in vocab.items():
        tokens[i] = t
    for t, i in specials.items():
        tokens[i] = t
        types[i] = int(gguf.TokenType.CONTROL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    path = tmp / "llama3.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128009)
    w.add_eot_token_id(128009)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = tiktoken.Encoding(name="ref", pat_str=spec["pat_str"],
                            mergeable_ranks=load_tiktoken_bpe(str(fixtures / "llama3-tokenizer" /
                                                                  "tokenizer.model")),
                            special_tokens=specials)
    return path, ref


def test_llama3_gguf_matches_tiktoken(llama3_gguf) -> None:
    path, ref = llama3_gguf
    tok = load_gguf_tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (128256, 128000, 128009, True)
    assert {128001, 128008, 128009} <= tok.stop_ids
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128009]
    for s in CORPUS:
        assert tok.encode(s, bos=False) == ref.encode(s, disallowed_special=()), repr(s)
        assert tok.encode_with_special(s) == ref.encode(s, allowed_special="all"), repr(s)
        assert tok.decode(tok.encode(s, bos=False)) == s


# ---- errors ----

def test_unsupported_tokenizer_metadata_is_a_clear_error(tmp_path: Path) -> None:
    def write(name: str, model: str, pre: str | None) -> Path:
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_tokenizer_model(model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(["a b"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(TokenizerError, match=r"t5\.gguf: tokenizer\.ggml\.model 't5' is not supported"):
        load_gguf_tokenizer(write("t5.gguf", "t5", None))
    with pytest.raises(TokenizerError, match=r"pre\.gguf: tokenizer\.ggml\.pre 'chatglm-bpe' is not supported"):
        load_gguf_tokenizer(write("pre.gguf", "gpt2", "chatglm-bpe"))
    tok = load_gguf_tokenizer(write("ok.gguf", "gpt2", None))
    assert tok.encode("abab", bos=False) == [2, 2]
    assert gguf_chat_template(tmp_path / "ok.gguf") is None
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(TokenizerError, match=r"bad\.gguf: truncated GGUF header"):
        load_gguf_tokenizer(tmp_path / "bad.gguf")
