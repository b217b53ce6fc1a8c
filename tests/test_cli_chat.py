"""`llamarun chat` driven by a script on stdin (one message per line)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from llamarun.cli import app
from llamarun.engine import Engine
from llamarun.sampling import SamplingParams
from llamarun.saved_chat import SavedChat, load_chat, save_chat
from engine_util import engine, one_thread, run_cli, stories_meta  # noqa: F401

GREEDY = SamplingParams.greedy()


def chat(script: str, *args: str):  # noqa: ANN201 (typer's Result)
    return CliRunner().invoke(app, ["chat", "-m", str(stories_meta()), "--dtype", "float32",
                                    "-t", "0", "-n", "12", *args],
                              input=script, env={"LLAMARUN_MODEL": None})


def replies(engine: Engine, messages: list[str], *, system: str | None = None) -> tuple[list[str], list[int]]:
    session = engine.chat(system=system)
    texts, prefills = [], []
    for m in messages:
        gen = session.send(m, sampling=GREEDY, max_new_tokens=12)
        texts.append("".join(c.text for c in gen))
        prefills.append(gen.result.prefill_tokens)
    return texts, prefills


def test_two_turns_and_incremental_prefill(engine: Engine) -> None:
    r = chat("Hi there\n/stats\nTell me a story\n/stats\n")
    assert r.exit_code == 0, r.output
    texts, prefills = replies(engine, ["Hi there", "Tell me a story"])
    assert r.stdout == "".join(t + "\n" for t in texts)
    counts = [int(n) for n in re.findall(r"prefilled (\d+) tok", r.stderr)]
    assert counts == prefills
    first_prompt = engine.chat_format.encode_dialog([{"role": "user", "content": "Hi there"}])
    assert counts[0] == len(first_prompt)
    whole = engine.chat_format.encode_dialog([
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": texts[0]},
        {"role": "user", "content": "Tell me a story"}])
    assert counts[1] <= len(whole) - len(first_prompt)  # only the new turn, not the whole dialog
    used = [int(n) for n in re.findall(r"context: (\d+) of 512", r.stderr)]
    assert used[1] > used[0] > 0


def test_clear_system_and_set(engine: Engine) -> None:
    script = "\n".join([
        "Hi", "/set temperature 0.9", "/set top_p 2", "/set seed 7", "/set bogus 1",
        "/set temperature 0", "/system You are a pirate.", "Hi", "/clear", "Hi", "/nope", "/exit",
        "never sent",
    ]) + "\n"
    r = chat(script)
    assert r.exit_code == 0, r.output
    plain, _ = replies(engine, ["Hi"])
    pirate, _ = replies(engine, ["Hi", "Hi"], system="You are a pirate.")
    fresh, _ = replies(engine, ["Hi"], system="You are a pirate.")
    # /system keeps the history and re-encodes it; /clear starts over with the system prompt
    assert r.stdout == plain[0] + "\n" + pirate[1] + "\n" + fresh[0] + "\n"
    assert "temperature = 0.9" in r.stderr and "seed = 7" in r.stderr
    assert "error: top_p must be in (0, 1] (1 = off), got 2\n" in r.stderr
    assert "error: usage: /set NAME VALUE" in r.stderr
    assert "error: unknown command /nope" in r.stderr
    assert "system prompt set" in r.stderr and "new conversation" in r.stderr


def test_multiline_message(engine: Engine) -> None:
    r = chat('"""\nOnce upon a time\nthere was a cat\n"""\n')
    texts, _ = replies(engine, ["Once upon a time\nthere was a cat"])
    assert r.exit_code == 0 and r.stdout == texts[0] + "\n"


def test_overflow_drops_oldest_turn() -> None:
    script = "".join(f"Tell me story number {i}\n" for i in range(6)) + "/stats\n"
    r = chat(script, "--max-seq-len", "96", "--system", "Be brief.", "-n", "16")
    assert r.exit_code == 0, r.output
    assert "dropped the 1 oldest turn(s) to fit the context" in r.stderr
    assert len(r.stdout.strip().splitlines()) >= 6
    used = int(re.findall(r"context: (\d+) of 96", r.stderr)[-1])
    assert used <= 96


def test_message_too_long_for_context_is_reported() -> None:
    r = chat("Once upon a time there was a little girl named Lily who loved to play\nHi\n",
             "--max-seq-len", "24")
    assert r.exit_code == 1 and r.stdout.count("\n") == 1  # piped: a failed message exits 1
    assert r.stderr.count("error: the message needs") == 1


def test_scripted_subprocess() -> None:
    r = run_cli("chat", "-m", str(stories_meta()), "-t", "0", "-n", "8", input="Hi\nHello\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 2 and "Traceback" not in r.stderr


def resumed_reply(engine: Engine, messages: list[dict[str, str]], text: str,
                  system: str | None = None) -> str:
    session = engine.chat(system=system)
    session.messages = [dict(m) for m in messages]
    return "".join(c.text for c in session.send(text, sampling=GREEDY, max_new_tokens=12))


def test_save_then_load_resumes_the_conversation(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    r = chat("Hi there\nTell me a story\n", "--save", str(path), "--system", "Be kind.")
    assert r.exit_code == 0, r.output
    texts, _ = replies(engine, ["Hi there", "Tell me a story"], system="Be kind.")
    saved = load_chat(path)
    assert saved.system == "Be kind." and saved.model == str(stories_meta())
    assert saved.messages == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": texts[0]},
        {"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": texts[1]}]
    assert saved.sampling.temperature == 0 and saved.max_tokens == 12

    again = tmp_path / "again.json"
    r = chat("And then?\n", "--load", str(path), "--save", str(again))
    assert r.exit_code == 0, r.output
    assert "resumed 2 turn(s) from" in r.stderr
    assert r.stdout == resumed_reply(engine, saved.messages, "And then?", "Be kind.") + "\n"
    assert load_chat(again).messages[:4] == saved.messages
    assert len(load_chat(again).messages) == 6


def test_load_and_save_round_trip_exactly(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert chat("Hi\n", "--save", str(first), "-s", "5").exit_code == 0
    r = chat("", "--load", str(first), "--save", str(second), "-s", "5")
    assert r.exit_code == 0, r.output
    assert second.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")


def test_load_restores_settings_unless_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_chat(path, SavedChat(messages=[], sampling=SamplingParams(temperature=0.3, top_k=5),
                              max_tokens=7))
    r = CliRunner().invoke(app, ["chat", "-m", str(stories_meta()), "--load", str(path),
                                 "--top-k", "9", "--save", str(path)],
                           input="", env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    saved = load_chat(path)
    assert saved.sampling.temperature == 0.3 and saved.sampling.top_k == 9
    assert saved.max_tokens == 7


def test_save_and_load_commands(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    r = chat(f"Hi\n/save {path}\n/clear\n/load {path}\nHello\n/save\n/load\n/load {tmp_path}\n")
    assert r.exit_code == 0, r.output
    texts, _ = replies(engine, ["Hi"])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": texts[0]}]
    assert r.stdout == texts[0] + "\n" + resumed_reply(engine, history, "Hello") + "\n"
    assert "saved 1 turn(s) to" in r.stderr and "saved 2 turn(s) to" in r.stderr
    assert "resumed 1 turn(s) from" in r.stderr
    assert "error: usage: /load FILE" in r.stderr
    assert f"error: {tmp_path}: saved chat is a folder, not a regular file" in r.stderr
    assert len(load_chat(path).messages) == 4


def test_save_without_a_file_is_a_usage_error() -> None:
    r = chat("/save\n")
    assert r.exit_code == 0 and "error: usage: /save FILE" in r.stderr


def test_load_refuses_other_files_before_loading_a_model(tmp_path: Path) -> None:
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    r = chat("Hi\n", "--load", str(bad))
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == f'error: {bad}: not a saved llamarun chat (no "format": "llamarun-chat")\n'
    r = chat("Hi\n", "--save", str(tmp_path / "missing" / "x.json"))
    assert r.exit_code == 1 and r.stderr.startswith("error: --save must be a file in an existing")


def test_show_and_bare_set_print_the_settings_in_force() -> None:
    r = chat("/set temperature 0.5\n/set seed 7\n/show\n/system Be brief.\n/set\n", "--stop", "END")
    assert r.exit_code == 0, r.output
    blocks = r.stderr.split("temperature     ")[1:]
    assert len(blocks) == 2
    for block in blocks:
        lines = ("temperature     " + block).splitlines()
        values = dict(line.split(None, 1) for line in lines[:11])
        assert values["temperature"] == "0.5" and values["seed"] == "7"
        assert values["max_tokens"] == "12" and values["stop"] == "'END'"
        assert values["model"] == str(stories_meta()) and values["context"] == "512 tokens"
    assert "system          none" in blocks[0] and "system          'Be brief.'" in blocks[1]
