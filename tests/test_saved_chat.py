"""Saved conversations: the JSON format round-trips, bad files are refused, writes are atomic."""

from __future__ import annotations

import json
import os
import signal
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
