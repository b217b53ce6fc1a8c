"""Fuzz target (issue 18): saved chats, mutated, nested, huge or not JSON at all. Each case must
load (and then save and load back the same) or be one InvalidArgumentError, in time and memory
bounded by the worker's alarm and address-space limit; a refused /load keeps the conversation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import Worker, check

EXAMPLES = int(os.environ.get("LLAMARUN_FUZZ_EXAMPLES", "0")) or None

BASE = {"format": "llamarun-chat", "version": 1, "model": "org/model", "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "sampling": {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                     "repeat_penalty": 1.1, "repeat_last_n": 64, "seed": None},
        "max_tokens": 64}
KEYS = list(BASE) + ["extra"]
ODD_TEXT = st.sampled_from(["", "\x1b[2J\x1b]0;title\x07", "<|eot_id|>", "\u2028", "a" * 100_000,
                            "\U0001f600", "\x00"]) | st.text(max_size=20)
SCALARS = (st.none() | st.booleans() | st.integers() | st.sampled_from([2**63, -1, 0, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True) | ODD_TEXT)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


@st.composite
def saved_chat_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:  # nesting deep enough to exhaust the parser's recursion, or just past the bound
        depth = draw(st.sampled_from([65, 1000, 100_000]))
        return ('{"format": "llamarun-chat", "version": 1, "messages": '
                + "[" * depth + "]" * depth + "}").encode()
    if kind == 2:  # many turns, or a long one: loading stays linear
        n = draw(st.sampled_from([1, 5_000, 50_000]))
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}
                 for i in range(2 * n)]
        return json.dumps({**BASE, "messages": turns}).encode()
    if kind == 3:  # escapes JSON allows that UTF-8 does not: lone surrogates
        text = draw(st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"\\u0000"', '"\\u001b[31m"']))
        field = draw(st.sampled_from(["system", "model", "content"]))
        raw = json.dumps(BASE)
        if field == "content":
            return raw.replace('"Hello"', text).encode()
        return raw.replace(json.dumps(BASE[field]), text).encode()
    if kind == 4:  # numbers Python refuses or bends
        number = draw(st.sampled_from(["9" * 5000, "1e999", "-0", "NaN", "Infinity", "1" * 4300]))
        field = draw(st.sampled_from(["version", "max_tokens", "temperature", "seed"]))
        raw = json.dumps(BASE)
        key = f'"{field}": '
        start = raw.index(key) + len(key)
        end = min(i for i in (raw.find(",", start), raw.find("}", start)) if i >= 0)
        return (raw[:start] + number + raw[end:]).encode()
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "sampling", "message"]))
        if where == "top":
            key = draw(st.sampled_from(KEYS))
            if draw(st.booleans()) and key in data:
                del data[key]
            else:
                data[key] = draw(VALUES)
        elif where == "sampling" and isinstance(data.get("sampling"), dict):
            data["sampling"][draw(st.sampled_from(list(BASE["sampling"]) + ["warmth"]))] = draw(VALUES)
        elif isinstance(data.get("messages"), list) and data["messages"]:
            i = draw(st.integers(0, len(data["messages"]) - 1))
            data["messages"][i] = draw(VALUES | st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                 "content": ODD_TEXT}))
    raw = json.dumps(data, allow_nan=True).encode()
    if draw(st.integers(0, 5)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]  # cut short
    if draw(st.integers(0, 5)) == 0:
        raw = b"\xef\xbb\xbf" + raw  # a BOM
    return raw


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


@settings(max_examples=EXAMPLES or 60, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(content=saved_chat_bytes())
def test_fuzz_saved_chats(worker: Worker, tmp_path_factory: pytest.TempPathFactory,
                          content: bytes) -> None:
    tmp = tmp_path_factory.getbasetemp()
    path = tmp / "chat.json"
    path.write_bytes(content)
    case = {"target": "saved_chat", "path": str(path), "out": str(tmp / "again.json"),
            "timeout": 20}
    check(worker.run(case), case)
