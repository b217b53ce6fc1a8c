"""`llamarun tokenize` through Typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fixtures_util import require_default_model, require_fixture
from llamarun.cli import app
from llamarun.tokenizer import detect_tokenizer_kind

runner = CliRunner()


def test_ids_and_pieces() -> None:
    folder = require_fixture("llama2-tokenizer")
    result = runner.invoke(app, ["tokenize", "--model", str(folder), "Hello world"])
    assert result.exit_code == 0, result.output
    # the text each token stands for (SentencePiece's ▁ is a space); --raw: the pieces
    assert result.stdout.splitlines() == ['    1  "<s>"', '15043  " Hello"', ' 3186  " world"']
    raw = runner.invoke(app, ["tokenize", "--model", str(folder), "--raw", "Hello world"])
    assert raw.stdout.splitlines() == ['    1  "<s>"', '15043  "▁Hello"', ' 3186  "▁world"']


def test_json_no_bos() -> None:
    path = require_fixture("llama3-tokenizer", "tokenizer.model")
    result = runner.invoke(app, ["tokenize", "--tokenizer", str(path), "--no-bos", "--json", "Hello world\n"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ids"][:2] == [9906, 1917]
    assert data["pieces"][:2] == ["Hello", " world"]
    assert len(data["ids"]) == len(data["pieces"])


def test_chat_shows_the_rendered_prompt() -> None:
    path = require_fixture("llama3-tokenizer", "tokenizer.model")
    result = runner.invoke(app, ["tokenize", "--tokenizer", str(path), "--chat", "--json", "Hi"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ids"] == [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271]


def test_chat_llama2_model_folder() -> None:
    folder = require_fixture("stories260K", "meta")
    result = runner.invoke(app, ["tokenize", "-m", str(folder), "--chat", "--json", "Hi"])
    assert result.exit_code == 0, result.output
    pieces = json.loads(result.stdout)["pieces"]
    assert pieces[0] == "<s>" and "".join(pieces[1:]).replace("▁", " ").startswith(" [INST] Hi [/INST]")


def test_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tokenize", "--model", str(tmp_path / "missing"), "x"])
    assert result.exit_code == 1
    # the same message as every other command's --model
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: no such file or folder (from --model)"]
    result = runner.invoke(app, ["tokenize", "--model", str(tmp_path), "--tokenizer", str(tmp_path), "x"])
    assert result.exit_code == 1 and "not both" in result.stderr
    (tmp_path / "tokenizer.model").write_bytes(b"not a tokenizer")
    result = runner.invoke(app, ["tokenize", "--model", str(tmp_path), "x"])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.output


def test_gguf_detected_by_magic(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert detect_tokenizer_kind(path) == "gguf"


def test_byte_level_pieces_show_their_text() -> None:
    gguf = require_default_model()  # SmolLM2: GPT-2 byte-level BPE
    r = runner.invoke(app, ["tokenize", "-m", str(gguf), "Hello world\n\u00e9 \U0001F600"])
    assert r.exit_code == 0, r.output
    shown = [line.split(None, 1)[1] for line in r.stdout.splitlines()]
    # Ġ is a space, Ċ a newline, Ã© the two bytes of é; an emoji split across tokens shows the
    # bytes of each part
    assert shown == ['"Hello"', '" world"', '"\\n"', '"é"', '" \\xf0\\x9f\\x98"', '"\\x80"']
    raw = runner.invoke(app, ["tokenize", "-m", str(gguf), "--raw", "Hello world\n\u00e9"])
    assert [line.split(None, 1)[1] for line in raw.stdout.splitlines()] == [
        '"Hello"', '"Ġworld"', '"Ċ"', '"Ã©"']
    js = runner.invoke(app, ["tokenize", "-m", str(gguf), "--json", "Hello world\n"])
    data = json.loads(js.stdout)
    assert data["pieces"] == ["Hello", "Ġworld", "Ċ"] and data["text"] == ["Hello", " world", "\n"]
