"""StreamDecoder: deltas concatenate to decode(all ids), never show a premature U+FFFD, cut at stop strings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_util import fixtures_dir, require_fixture
from llamarun.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from tokenizer_corpus import make_hf_folder, make_llama3_hf_folder

NAMES = ["llama2", "stories-spm", "llama3", "stories-hf", "llama3-hf"]
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@lru_cache(maxsize=None)
def _tokenizer(name: str, tmp: Path) -> Tokenizer:
    if name == "llama2":
        return load_tokenizer(require_fixture("llama2-tokenizer"))
    if name == "stories-spm":
        return load_tokenizer(require_fixture("stories260K", "meta"))
    if name == "llama3":
        return load_tokenizer(require_fixture("llama3-tokenizer"))
    if name == "stories-hf":
        return load_tokenizer(make_hf_folder(tmp / name, require_fixture("stories260K", "hf")))
    require_fixture("llama3-tokenizer")
    return load_tokenizer(make_llama3_hf_folder(tmp / name, fixtures_dir()))


@pytest.fixture(params=NAMES, scope="module")
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return _tokenizer(request.param, tmp_path_factory.getbasetemp())


def _interesting_ids(tok: Tokenizer) -> list[int]:
    """Ids that stress the decoder: single bytes, partial UTF-8, specials, spaces, newlines."""
    ids = [i for i in (tok.bos_id, tok.eos_id, *tok.stop_ids) if i is not None]
    for i in range(min(tok.vocab_size, 600)):
        if len(tok.token_bytes(i)) <= 2:
            ids.append(i)
    for text in ("€", "你好", "👨‍👩‍👧", " ", "  ", "\n", " a", "é"):
        ids.extend(tok.encode(text, bos=False))
    return sorted(set(ids))


def _id_lists(tok: Tokenizer) -> st.SearchStrategy[list[int]]:
    special = _interesting_ids(tok)
    one = st.one_of(st.sampled_from(special), st.integers(0, tok.vocab_size - 1))
    return st.lists(one, max_size=40)


def _run(tok: Tokenizer, ids: list[int], stops: tuple[str, ...] = ()) -> tuple[StreamDecoder, list[str]]:
    dec = StreamDecoder(tok, stop_strings=stops)
    full = tok.decode(ids)
    deltas = []
    for i in ids:
        deltas.append(dec.push(i))
        assert full.startswith(dec.text), (ids, full, dec.text)  # nothing emitted that a later id could change
    deltas.append(dec.flush())
    return dec, deltas


def test_random_ids(tok: Tokenizer) -> None:
    @SETTINGS
    @given(ids=_id_lists(tok))
    def check(ids: list[int]) -> None:
        dec, deltas = _run(tok, ids)
        assert "".join(deltas) == dec.text == tok.decode(ids)
        assert not dec.stopped

    check()


def test_valid_text_never_shows_replacement(tok: Tokenizer) -> None:
    @SETTINGS
    @given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
    def check(text: str) -> None:
        ids = tok.encode(text, bos=True)
        dec, deltas = _run(tok, ids)
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids)

    check()


def test_stop_strings(tok: Tokenizer) -> None:
    @SETTINGS
    @given(ids=_id_lists(tok), data=st.data())
    def check(ids: list[int], data: st.DataObject) -> None:
        full = tok.decode(ids)
        if full:
            start = data.draw(st.integers(0, len(full) - 1))
            stop = full[start : start + data.draw(st.integers(1, 6))]
        else:
            stop = "zz"
        dec, deltas = _run(tok, ids, (stop, "<never>"))
        cut = full.find(stop)
        expected = full if cut < 0 else full[:cut]
        assert "".join(deltas) == dec.text == expected
        assert dec.stopped == (cut >= 0)

    check()


def test_byte_fallback_characters_are_held_until_complete() -> None:
    tok = _tokenizer("llama2", Path("/nonexistent"))
    emoji = [1, *tok.encode("😀", bos=False)]  # <s>, ▁, <0xF0>, <0x9F>, <0x98>, <0x80>
    assert len(emoji) == 6
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in emoji]
    assert deltas[-1] == "😀" and all(d == "" for d in deltas[:-1])
    assert dec.flush() == ""
    # An incomplete character is released at flush with the reference's replacement behaviour.
    dec = StreamDecoder(tok)
    partial = emoji[:-2]
    assert "".join(dec.push(i) for i in partial) == ""
    assert dec.flush() == tok.decode(partial) == "\ufffd\ufffd"


def test_leading_space_rule() -> None:
    tok = _tokenizer("llama2", Path("/nonexistent"))
    ids = tok.encode("Hello world", bos=True)
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids] == ["", "Hello", " world"]


def test_stop_prefix_is_held_back() -> None:
    tok = _tokenizer("llama3", Path("/nonexistent"))
    ids = tok.encode("Answer: 42\nUser: more", bos=False)
    dec = StreamDecoder(tok, stop_strings=["\nUser:"])
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert out == dec.text == "Answer: 42"
    assert dec.stopped
    assert dec.push(ids[0]) == ""
    dec = StreamDecoder(tok, stop_strings=["\nUser:"])
    ids = tok.encode("Answer: 42\nUse", bos=False)
    assert "".join(dec.push(i) for i in ids) == "Answer: 42"
    assert dec.flush() == "\nUse" and not dec.stopped
