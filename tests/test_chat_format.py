"""Chat formats: Meta's Llama 2 and Llama 3 layouts written out by hand, HF templates against transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from fixtures_util import fixtures_dir, require_fixture
from llamarun.errors import InvalidArgumentError, TokenizerError
from llamarun.tokenizer import Tokenizer, load_chat_format, load_tokenizer
from llamarun.tokenizer.chat import HFTemplateChatFormat, Llama2ChatFormat, Llama3ChatFormat, PlainChatFormat
from tokenizer_corpus import (
    CHATML_TEMPLATE,
    FEATURES_TEMPLATE,
    LLAMA2_TEMPLATE,
    make_hf_folder,
    make_llama3_hf_folder,
)

SYS = "You are a helpful assistant.\nAnswer briefly."
DIALOGS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": SYS}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "  Tell me a joke.  "},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    [
        {"role": "system", "content": "Réponds en français. 🇫🇷"},
        {"role": "user", "content": "Bonjour <s> [INST] <|eot_id|>"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "日本語で？\n\n改行も"},
    ],
]


# ---------------------------------------------------------------- Llama 2 (Meta chat_completion)


@pytest.fixture(scope="module")
def llama2() -> tuple[Tokenizer, spm.SentencePieceProcessor]:
    path = require_fixture("llama2-tokenizer", "tokenizer.model")
    return load_tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))


def test_llama2_literal_ids(llama2: Any) -> None:
    tok, _ = llama2
    fmt = load_chat_format(tok)
    assert isinstance(fmt, Llama2ChatFormat)
    # <s>[INST] Hi [/INST]
    assert fmt.encode_dialog(DIALOGS[0]) == [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962]
    # <s>[INST] Hi [/INST] Hello! </s><s>[INST] Hi [/INST]
    two_turns = [DIALOGS[0][0], {"role": "assistant", "content": "Hello!"}, DIALOGS[0][0]]
    assert fmt.encode_dialog(two_turns) == [
        1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962, 15043, 29991, 29871, 2,
        1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962,
    ]  # fmt: skip


def test_llama2_spec(llama2: Any) -> None:
    tok, sp = llama2
    fmt = load_chat_format(tok)
    bos, eos = [1], [2]
    e = sp.encode
    assert fmt.encode_dialog(DIALOGS[1]) == bos + e(f"[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\nWhat is 2+2? [/INST]")
    assert fmt.encode_dialog(DIALOGS[2]) == (
        bos + e("[INST] Tell me a joke. [/INST] Why did the chicken cross the road? ") + eos + bos + e("[INST] Why? [/INST]")
    )
    assert fmt.encode_dialog(DIALOGS[3]) == (
        bos
        + e("[INST] <<SYS>>\nRéponds en français. 🇫🇷\n<</SYS>>\n\nBonjour <s> [INST] <|eot_id|> [/INST] Salut ! ")
        + eos
        + bos
        + e("[INST] 日本語で？\n\n改行も [/INST]")
    )
    # A closed dialog (ending with the assistant) ends with EOS.
    assert fmt.encode_dialog(DIALOGS[2][:2], add_generation_prompt=False)[-1] == 2


def test_llama2_followup(llama2: Any) -> None:
    tok, _ = llama2
    fmt = load_chat_format(tok)
    history = DIALOGS[2][:2]
    new = [DIALOGS[2][2]]
    assert fmt.encode_followup(history, new) == [2, *fmt.encode_dialog(new)]


def test_llama2_rejects_bad_roles(llama2: Any) -> None:
    fmt = load_chat_format(llama2[0])
    with pytest.raises(InvalidArgumentError):
        fmt.encode_dialog([{"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidArgumentError):
        fmt.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---------------------------------------------------------------- Llama 3 (Meta ChatFormat)


@pytest.fixture(scope="module")
def llama3() -> tuple[Tokenizer, tiktoken.Encoding]:
    tok = load_tokenizer(require_fixture("llama3-tokenizer"))
    spec = json.loads(require_fixture("llama3-tokenizer", "special_tokens.json").read_text())
    ref = tiktoken.Encoding(
        name="ref",
        pat_str=spec["pat_str"],
        mergeable_ranks=load_tiktoken_bpe(str(require_fixture("llama3-tokenizer", "tokenizer.model"))),
        special_tokens=dict(spec["conventions"]["llama3.1+"]["special_tokens"]),
    )
    return tok, ref


def _llama3_expected(ref: tiktoken.Encoding, dialog: list[dict[str, str]], gen: bool = True) -> list[int]:
    ids = [128000]
    for m in dialog:
        ids += [128006, *ref.encode(m["role"]), 128007, *ref.encode("\n\n")]
        ids += [*ref.encode(m["content"].strip(), disallowed_special=()), 128009]
    if gen:
        ids += [128006, *ref.encode("assistant"), 128007, *ref.encode("\n\n")]
    return ids


def test_llama3_literal_ids(llama3: Any) -> None:
    tok, _ = llama3
    fmt = load_chat_format(tok)
    assert isinstance(fmt, Llama3ChatFormat)
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
    assert fmt.encode_dialog(DIALOGS[0]) == [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271]


def test_llama3_spec(llama3: Any) -> None:
    tok, ref = llama3
    fmt = load_chat_format(tok)
    for dialog in DIALOGS:
        assert fmt.encode_dialog(dialog) == _llama3_expected(ref, dialog)
        assert fmt.encode_dialog(dialog, add_generation_prompt=False) == _llama3_expected(ref, dialog, gen=False)
    # The user's literal "<|eot_id|>" text is not the special token.
    user_ids = fmt.encode_dialog(DIALOGS[3])
    assert user_ids.count(128009) == len(DIALOGS[3])  # one per message, none from the text


def test_llama3_followup_extends_cache(llama3: Any) -> None:
    tok, _ = llama3
    fmt = load_chat_format(tok)
    for dialog in (DIALOGS[2], DIALOGS[3]):
        history, new = dialog[:-1], dialog[-1:]
        cached = fmt.encode_dialog(history[:-1]) + tok.encode(history[-1]["content"].strip(), bos=False)
        assert cached + fmt.encode_followup(history, new) == fmt.encode_dialog(dialog)


# ---------------------------------------------------------------- HF chat templates vs transformers


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = require_fixture("stories260K", "hf")
    base = tmp_path_factory.mktemp("chat")
    folders = {
        "chatml": make_hf_folder(base / "chatml", src, chat_template=CHATML_TEMPLATE, extra_special=("<|im_start|>", "<|im_end|>"), eos_token="<|im_end|>"),
        "llama2": make_hf_folder(base / "llama2", src, chat_template=LLAMA2_TEMPLATE),
        "features": make_hf_folder(base / "features", src, chat_template=FEATURES_TEMPLATE),
    }
    if (fixtures_dir() / "llama3-tokenizer").is_dir():
        folders["llama3"] = make_llama3_hf_folder(base / "llama3", fixtures_dir())
    return folders


def _apply(ref: Any, dialog: list[dict[str, str]], gen: bool) -> list[int]:
    out = ref.apply_chat_template(dialog, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", ["chatml", "llama2", "features", "llama3"])
def test_hf_template_matches_transformers(hf_folders: dict[str, Path], name: str) -> None:
    transformers = pytest.importorskip("transformers")
    if name not in hf_folders:
        pytest.skip("llama3 fixture absent")
    folder = hf_folders[name]
    tok = load_tokenizer(folder)
    fmt = load_chat_format(tok, folder)
    assert isinstance(fmt, HFTemplateChatFormat)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    for dialog in DIALOGS:
        for gen in (True, False):
            # DIALOGS[3] holds special-token text, which stays text here (test_chat_injection.py).
            if dialog is not DIALOGS[3]:
                assert fmt.encode_dialog(dialog, add_generation_prompt=gen) == _apply(ref, dialog, gen), (name, dialog)
            rendered = ref.apply_chat_template(dialog, tokenize=False, add_generation_prompt=gen)
            assert fmt.render(dialog, add_generation_prompt=gen) == rendered
    if name in ("llama2", "llama3"):
        bos = tok.bos_id
        assert fmt.encode_dialog(DIALOGS[0]).count(bos) == 1  # the template's own BOS, no second one


def test_llama3_template_equals_meta_format(hf_folders: dict[str, Path], llama3: Any) -> None:
    if "llama3" not in hf_folders:
        pytest.skip("llama3 fixture absent")
    hf_fmt = load_chat_format(load_tokenizer(hf_folders["llama3"]), hf_folders["llama3"])
    meta_fmt = load_chat_format(llama3[0])
    # DIALOGS[3] has "<|eot_id|>" typed by the user: both keep it as text.
    for dialog in DIALOGS:
        assert hf_fmt.encode_dialog(dialog) == meta_fmt.encode_dialog(dialog)
    history, new = DIALOGS[2][:-1], DIALOGS[2][-1:]
    assert hf_fmt.encode_followup(history, new) == meta_fmt.encode_followup(history, new)


def test_hf_template_followup(hf_folders: dict[str, Path]) -> None:
    folder = hf_folders["chatml"]
    tok = load_tokenizer(folder)
    fmt = load_chat_format(tok, folder)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    new = [{"role": "user", "content": "Tell me more."}]
    expected = tok.encode_with_special("<|im_end|>\n<|im_start|>user\nTell me more.<|im_end|>\n<|im_start|>assistant\n")
    assert fmt.encode_followup(history, new) == expected
    assert tok.bos_id not in expected


def test_template_errors_are_tokenizer_errors(hf_folders: dict[str, Path]) -> None:
    tok = load_tokenizer(hf_folders["llama2"])
    fmt = load_chat_format(tok, hf_folders["llama2"])
    with pytest.raises(TokenizerError, match="alternate"):
        fmt.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # A template that does not compile leaves the format loadable (raw completion needs none) and
    # fails with one line when a chat is encoded.
    broken = load_chat_format(tok, chat_template="{% for %}")
    with pytest.raises(TokenizerError, match="compile"):
        broken.encode_dialog([{"role": "user", "content": "a"}])


def test_selection(hf_folders: dict[str, Path], tmp_path: Path) -> None:
    stories_meta = load_tokenizer(require_fixture("stories260K", "meta"))
    assert load_chat_format(stories_meta).name == "llama2"
    # An explicit template (e.g. from GGUF metadata) wins over the folder's.
    tok = load_tokenizer(hf_folders["llama2"])
    assert load_chat_format(tok, hf_folders["llama2"], chat_template=CHATML_TEMPLATE).source == CHATML_TEMPLATE
    assert load_chat_format(tok, hf_folders["llama2"]).source == LLAMA2_TEMPLATE
    # A folder template wins over the tokenizer family; without one the family decides.
    (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    assert load_chat_format(stories_meta, tmp_path).name == "hf-template"
    no_template = make_hf_folder(tmp_path / "plain", require_fixture("stories260K", "hf"))
    assert load_chat_format(load_tokenizer(no_template), no_template).name == "llama2"


def test_plain_format() -> None:
    tok = load_tokenizer(require_fixture("stories260K", "meta"))
    fmt = PlainChatFormat(tok)
    assert fmt.encode_dialog([{"role": "user", "content": "Once upon a time"}]) == tok.encode("Once upon a time\n\n", bos=True)
