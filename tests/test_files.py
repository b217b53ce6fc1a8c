"""llamarun.files: one reader per kind of file, each bounded, refusing what is not a regular
file; and the readers' users (configs, tokenizers, templates, perplexity text, stdin)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from llamarun import files
from llamarun.config import read_json
from llamarun.errors import ConfigError, InvalidArgumentError, TokenizerError
from llamarun.tokenizer import load_chat_format, load_tokenizer
from llamarun.tokenizer.hf import find_chat_template

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A reader that blocks on a FIFO fails the test instead of hanging the run."""
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("the reader blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_json_object_is_read(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"a": [1, {"b": "é"}]}', encoding="utf-8")
    assert files.read_json(path, what="config", error=ConfigError) == {"a": [1, {"b": "é"}]}
    path.write_bytes(b'\xef\xbb\xbf{"bom": 1}')  # a BOM some editors write
    assert files.read_json(path, what="config", error=ConfigError) == {"bom": 1}


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: fifo(p), "config is a FIFO (named pipe), not a regular file"),
    (lambda p: p.mkdir(), "config is a folder, not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "config is a device file, not a regular file"),
    (lambda p: p.symlink_to(p.parent / "gone"), "config is a dangling link"),
    (lambda p: None, "config not found"),
])
def test_not_a_regular_file_is_one_line_at_once(tmp_path: Path, make, message: str) -> None:  # noqa: ANN001
    path = tmp_path / "c.json"
    make(path)
    start = time.monotonic()
    for read in (lambda: files.read_json(path, what="config", error=ConfigError),
                 lambda: files.read_text(path, what="config", error=ConfigError, limit=100),
                 lambda: files.read_bytes(path, what="config", error=ConfigError, limit=100)):
        with pytest.raises(ConfigError) as e:
            read()
        assert str(e.value) == f"{path}: {message}" or (
            "dangling" in message and str(e.value).startswith(f"{path}: {message}"))
    assert time.monotonic() - start < 5


def test_size_limit_is_checked_before_and_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 101)
    with pytest.raises(TokenizerError, match=r"big.txt: template is 101 bytes, larger than the 100 bytes"):
        files.read_text(path, what="template", error=TokenizerError, limit=100)
    path.write_bytes(b"x" * 100)
    assert files.read_text(path, what="template", error=TokenizerError, limit=100) == "x" * 100


def test_text_must_be_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok \xff")
    with pytest.raises(InvalidArgumentError, match=r"t.txt: text is not UTF-8 text \(invalid byte at offset 3\)"):
        files.read_text(path, what="text", error=InvalidArgumentError, limit=100)


@pytest.mark.parametrize("depth", [65, 999, 100_000])
def test_nesting_is_bounded(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}")
    with pytest.raises(ConfigError, match=r"deep.json: not valid JSON \(nested too deeply: more than 64 levels\)"):
        files.read_json(path, what="config", error=ConfigError)
    path.write_text('{"a": ' + "[" * 63 + "]" * 63 + "}")  # 64 levels: allowed
    assert files.json_depth(files.read_json(path, what="config", error=ConfigError), 100) == 64


@pytest.mark.parametrize(("text", "message"), [
    ('{"n": ' + "9" * 5000 + "}", "Exceeds the limit"),  # Python's int-digits limit: ValueError
    ("[1, 2]", "must hold a JSON object, not a list"),
    ('{"a": 1', "not valid JSON (Expecting ',' delimiter at line 1 column 8)"),
])
def test_bad_json_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        files.read_json(path, what="config", error=ConfigError)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_ok_is_none_but_a_dangling_link_is_an_error(tmp_path: Path) -> None:
    assert files.read_json(tmp_path / "none.json", what="x", error=ConfigError, missing_ok=True) is None
    (tmp_path / "d.json").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="dangling link"):
        files.read_json(tmp_path / "d.json", what="x", error=ConfigError, missing_ok=True)


class Endless(io.RawIOBase):
    """A stream that never ends (stdin from /dev/zero), counting what was read from it."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001
        b[:] = b"\0" * len(b)
        self.given += len(b)
        return len(b)


def test_endless_stream_stops_at_the_limit() -> None:
    stream = Endless()
    with pytest.raises(InvalidArgumentError, match="stdin is longer than 2 MiB"):
        files.read_stream(io.BufferedReader(stream), what="stdin", error=InvalidArgumentError,
                          limit=2 * files.MiB)
    assert stream.given <= 2 * files.MiB + 2 * 8192 + files.MiB  # stopped at once, not at EOF
    data = files.read_stream(io.BytesIO(b"abc"), what="stdin", error=InvalidArgumentError)
    assert data == b"abc"


def test_endless_line_stops_at_the_limit() -> None:
    text = io.TextIOWrapper(io.BufferedReader(Endless()))
    with pytest.raises(InvalidArgumentError, match="chat input: a line longer than 1,000 characters"):
        files.read_line(text, what="chat input", error=InvalidArgumentError, limit=1000)
    lines = io.StringIO("one\n" + "x" * 1000 + "\n")
    assert files.read_line(lines, what="in", error=InvalidArgumentError, limit=1000) == "one\n"
    assert files.read_line(lines, what="in", error=InvalidArgumentError, limit=1000) == "x" * 1000 + "\n"
    assert files.read_line(lines, what="in", error=InvalidArgumentError, limit=1000) == ""


# --- the readers' users ---------------------------------------------------------------------

def test_config_json_reader_is_the_shared_one(tmp_path: Path) -> None:
    path = fifo(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="JSON file is a FIFO"):
        read_json(path)


def tiny_tokenizer_folder(folder: Path) -> Path:
    folder.mkdir()
    tok = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_side_files_go_through_the_json_reader(tmp_path: Path) -> None:
    folder = tiny_tokenizer_folder(tmp_path / "tok")
    assert load_tokenizer(folder).encode("hello world", bos=False) == [1, 2]
    # Deep enough to exhaust Python's recursion before the check: once a RecursionError traceback.
    (folder / "tokenizer_config.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON \\(nested too deeply"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    fifo(folder / "generation_config.json")
    with pytest.raises(TokenizerError, match="generation_config.json: JSON file is a FIFO"):
        load_tokenizer(folder)


def test_tokenizer_file_that_is_no_regular_file(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    fifo(folder / "tokenizer.json")
    with pytest.raises(TokenizerError, match="tokenizer.json: tokenizer file is a FIFO"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").symlink_to("/dev/zero")
    with pytest.raises(TokenizerError, match="tokenizer.model: tokenizer file is a device file"):
        load_tokenizer(folder)


def test_chat_template_file_is_bounded(tmp_path: Path) -> None:
    folder = tiny_tokenizer_folder(tmp_path / "tok")
    fifo(folder / "chat_template.jinja")
    with pytest.raises(TokenizerError, match="chat_template.jinja: chat template is a FIFO"):
        find_chat_template(folder)
    tok = load_tokenizer(folder / "tokenizer.json")
    fmt = load_chat_format(tok, folder)  # broken template: completion still works
    with pytest.raises(TokenizerError, match="chat template is a FIFO"):
        fmt.encode_dialog([{"role": "user", "content": "hello"}])
    (folder / "chat_template.jinja").unlink()
    big = "x" * (files.MAX_TEMPLATE_BYTES + 1)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": big}))
    with pytest.raises(TokenizerError, match="the chat template is longer than 4 MiB"):
        find_chat_template(folder)


def run_cli(args: list[str], stdin: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMARUN_COMPILE": "0", "PYTHONPATH": str(REPO)}
    env.pop("LLAMARUN_MODEL", None)
    return subprocess.run([sys.executable, "-m", "llamarun", *args], stdin=stdin,
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


def test_endless_stdin_and_fifo_end_in_one_line(tmp_path: Path) -> None:
    """`complete -p - < /dev/zero` and `perplexity FIFO`: refused in seconds (the prompt is
    read before any model is looked for)."""
    missing = str(tmp_path / "no-model")
    with open("/dev/zero", "rb") as zero:
        start = time.monotonic()
        r = run_cli(["complete", "-m", missing, "-p", "-"], zero)
    assert r.returncode == 1 and time.monotonic() - start < 30
    assert r.stderr == "error: stdin is longer than 64 MiB; give a shorter text\n"
    path = fifo(tmp_path / "text.fifo")
    r = run_cli(["perplexity", str(path), "-m", missing], subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr == f"error: {path}: text file is a FIFO (named pipe), not a regular file\n"
