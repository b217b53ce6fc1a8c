"""Saved conversations: the JSON format round-trips, bad files are refused, writes are atomic."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamarun.errors import InvalidArgumentError
from llamarun.sampling import SamplingParams
from llamarun.saved_chat import SavedChat, load_chat, save_chat

REPO = Path(__file__).resolve().parent.parent

CHAT = SavedChat(
    messages=[{"role": "user", "content": "Hi ☃\n\"quoted\""},
              {"role": "assistant", "content": "Hello! [bold]not markup[/]"},
              {"role": "user", "content": ""}, {"role": "assistant", "content": "  spaces  "}],
    system="Be brief.", model="karpathy/stories260K",
    sampling=SamplingParams(temperature=0.5, top_k=7, top_p=0.9, min_p=0.0, seed=3),
    max_tokens=99)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    save_chat(path, CHAT)
    assert load_chat(path) == CHAT
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "llamarun-chat" and data["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left


def test_overwrite_keeps_one_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    save_chat(path, CHAT)
    empty = SavedChat(messages=[])
    save_chat(path, empty)
    assert load_chat(path) == empty
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(("content", "reason"), [
    (b"\xff\xfe", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", 'no "format"'),
    (b'{"format": "other"}', 'no "format"'),
    (b'{"format": "llamarun-chat", "version": 9, "messages": []}', "version 9"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": {}}', '"messages" must be a list'),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [{"role": "assistant", '
     b'"content": "x"}, {"role": "user", "content": "y"}]}', "message 1 has role 'assistant'"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [{"role": "user", "content": 1}]}',
     "message 1 must be an object with text content"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [{"role": "user", "content": "x"}]}',
     "no assistant reply"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [], "sampling": {"top_p": 3}}',
     "sampling: top_p must be"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [], "sampling": {"warmth": 3}}',
     'unknown sampling setting "warmth"'),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [], "max_tokens": 0}',
     '"max_tokens" must be an integer at least 1'),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [], "system": 5}',
     '"system" must be text'),
])
def test_not_a_saved_chat_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(InvalidArgumentError) as info:
        load_chat(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and reason in msg, msg


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no such file"):
        load_chat(tmp_path / "nope.json")
    with pytest.raises(InvalidArgumentError, match="saved chat is a folder, not a regular file"):
        load_chat(tmp_path)


_WRITER = """
import sys
from llamarun.saved_chat import SavedChat, save_chat
path = sys.argv[1]
print("ready", flush=True)
i = 0
while True:  # ~1 MB per file, each write a different conversation
    i += 1
    text = str(i) * (500_000 // len(str(i)))
    save_chat(path, SavedChat(messages=[{"role": "user", "content": text},
                                        {"role": "assistant", "content": str(i)}]))
"""


def test_kill_during_save_leaves_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    save_chat(path, CHAT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for delay in (0.05, 0.13, 0.21, 0.34):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        chat = load_chat(path)  # the old file or a whole new one, never part of one
        assert chat == CHAT or chat.messages[1]["content"] in chat.messages[0]["content"]
    assert load_chat(path) != CHAT  # the writer did replace the file at least once


# --- hostile files (issue 18) ------------------------------------------------------------------

def test_existing_file_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text("old")
    path.chmod(0o640)
    save_chat(path, CHAT)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and load_chat(path) == CHAT
    path.chmod(0o604)
    save_chat(path, CHAT)
    assert stat.S_IMODE(path.stat().st_mode) == 0o604
    new = tmp_path / "new.json"
    umask = os.umask(0o022)
    try:
        save_chat(new, CHAT)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # a new file: the umask's, as any file


def test_a_link_stays_a_link(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    save_chat(target, SavedChat(messages=[]))
    link = tmp_path / "link.json"
    link.symlink_to(target)
    save_chat(link, CHAT)
    assert link.is_symlink() and load_chat(target) == CHAT


def test_many_turns_load_in_linear_time(tmp_path: Path) -> None:
    path = tmp_path / "long.json"
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 20}
             for i in range(200_000)]  # about 40 MB
    save_chat(path, SavedChat(messages=turns))
    start = time.monotonic()
    assert len(load_chat(path).messages) == 200_000
    assert time.monotonic() - start < 20  # (a quadratic pass would take hours)


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"format": "llamarun-chat", "version": 1, "messages": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}", "nested too deeply"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": ' + b"[" * 70 + b"]" * 70 + b"}",
     "nested too deeply"),
    (b'{"format": "llamarun-chat", "version": ' + b"9" * 5000 + b"}", "Exceeds the limit"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [], "sampling": {"temperature": '
     + b"9" * 400 + b"}}", "sampling: temperature 9999"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [], "sampling": {"top_k": "x"}}',
     "sampling: top_k must be a number, got 'x'"),
    (b'{"format": "llamarun-chat", "version": 1, "messages": [{"role": "' + b"r" * 10_000
     + b'", "content": ""}]}', "message 1 has role 'rrrrr"),
])
def test_hostile_content_is_one_short_line(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(InvalidArgumentError) as info:
        load_chat(path)
    msg = str(info.value)
    assert "\n" not in msg and reason in msg and len(msg) < 300 + len(str(path)), msg


def test_too_big_and_not_regular_files_are_refused_at_once(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(65 << 20)  # sparse: never read
    fifo = tmp_path / "chat.fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="saved chat is 65 MiB, larger than the 64 MiB"):
        load_chat(big)
    with pytest.raises(InvalidArgumentError, match="saved chat is a FIFO"):
        load_chat(fifo)
    with pytest.raises(InvalidArgumentError, match="saved chat is a device file"):
        load_chat("/dev/zero")
    assert time.monotonic() - start < 5


def test_lone_surrogates_are_replaced_so_the_chat_saves_again(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"format": "llamarun-chat", "version": 1, "system": "a\\ud800b", "messages": '
                    '[{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "ok"}]}')
    chat = load_chat(path)
    assert chat.system == "a\ufffdb" and chat.messages[0]["content"] == "\ufffd"
    save_chat(tmp_path / "again.json", chat)
    assert load_chat(tmp_path / "again.json") == chat


class StubSession:
    """The parts of a ChatSession that /load touches."""

    def __init__(self) -> None:
        self.messages = [{"role": "user", "content": "unsaved"}, {"role": "assistant", "content": "yes"}]
        self.system: str | None = "mine"

    def clear(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None


def test_load_of_a_bad_file_keeps_the_conversation(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from llamarun.cli.repl import Repl

    deep = tmp_path / "deep.json"
    deep.write_text('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    session = StubSession()
    repl = Repl(session, SamplingParams(), max_tokens=8, stop=[], interactive=True)  # type: ignore[arg-type]
    for bad in (deep, fifo, "/dev/zero", tmp_path):
        assert repl.command(f"/load {bad}") is True  # the chat goes on
        assert session.messages[0]["content"] == "unsaved" and session.system == "mine"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, errors
    save_chat(tmp_path / "good.json", CHAT)
    assert repl.command(f"/load {tmp_path / 'good.json'}") is True
    assert session.messages == CHAT.messages and session.system == CHAT.system
