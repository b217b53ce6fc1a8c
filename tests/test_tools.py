"""Tool calling (llamarun.tools and the server's `tools`): parsing calls, checking tools, the
prompt against transformers' rendering, and the weather round trip through the `openai` client
on a tiny random Llama 3 model (Meta's tokenizer, no template: Meta's Llama 3.1 JSON format)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import torch

from llamarun import tools as tooling
from llamarun.config import ModelArgs
from llamarun.engine import Engine
from llamarun.tokenizer import load_chat_format, load_tokenizer
from llamarun.tokenizer.chat import HFTemplateChatFormat
from engine_util import one_thread, stories_meta  # noqa: F401
from fixtures_util import require_fixture
from model_util import random_meta_state_dict, write_meta_folder
from server_util import running_server

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
        "additionalProperties": False}}}
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"}]


# -- parsing and checking ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ('  <|python_tag|>{"name": "get_time", "arguments": {"zone": "UTC"}} ', [("get_time", {"zone": "UTC"})]),
    ('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "A"}}]',
     [("get_time", {}), ("get_weather", {"city": "A"})]),
    ('{"name": "get_time", "parameters": {}}; {"name": "get_time", "parameters": {"zone": "X"}}',
     [("get_time", {}), ("get_time", {"zone": "X"})]),
    ('<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"Z\\"}"}\n</tool_call>',
     [("get_time", {"zone": "Z"})]),
    ('{"name": "launch_rockets", "parameters": {}}', []),  # not one of the tools
    ('{"name": "get_time", "parameters": [1]}', []),
    ('The weather is {"name": "get_time"}', []),
    ('{"answer": 42}', []),
    ("Sunny.", []),
])
def test_parse_calls(text: str, expected: list[tuple[str, dict]]) -> None:
    calls = tooling.parse_calls(text, ["get_weather", "get_time"])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == len(calls)


STREAMED = [
    '{"name": "get_weather", "parameters": {"city": "Pa\\"ris}", "unit": "celsius"}}',
    '<|python_tag|>{"name": "get_time", "arguments": {"zone": "UTC"}}',
    '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "A"}}]',
    '{"name": "get_time", "parameters": {}}; {"name": "get_time", "parameters": {"zone": "[{"}}',
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Z"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "B"}}\n</tool_call>',
]


def _replay(stream: tooling.CallStream, text: str, step: int) -> list[tuple[int, list[dict]]]:
    """Feed `text` `step` characters at a time; the deltas, each with where it came out."""
    out = [(at, stream.feed(text[at:at + step])) for at in range(0, len(text), step)]
    return out + [(len(text), stream.finish(True))]


def _gathered(deltas: list[dict]) -> list[dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
        c["id"] = d.get("id", c["id"])
        c["name"] += d["function"].get("name", "")
        c["arguments"] += d["function"]["arguments"]
    return [calls[k] for k in sorted(calls)]


@pytest.mark.parametrize("text", STREAMED)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_calls_stream_as_they_are_written(text: str, step: int) -> None:
    names = ["get_weather", "get_time"]
    stream = tooling.CallStream(names)
    timeline = _replay(stream, text, step)
    assert stream.calling and not stream.content
    calls = _gathered([d for _, ds in timeline for d in ds])
    whole = tooling.parse_calls(text, names)
    assert [c["name"] for c in calls] == [c.name for c in whole]
    assert [json.loads(c["arguments"]) for c in calls] == [json.loads(c.arguments) for c in whole]
    assert all(c["id"].startswith("call_") for c in calls) and len({c["id"] for c in calls}) == len(calls)
    # incrementally: the first call's head goes out right after its name is written, and the
    # longest arguments in several pieces, the first of them before the text ends
    head_at = next(at for at, ds in timeline if any("id" in d for d in ds))
    assert head_at <= text.index(whole[0].name) + len(whole[0].name) + step
    longest = max(range(len(calls)), key=lambda k: len(calls[k]["arguments"]))
    pieces = [at for at, ds in timeline for d in ds
              if d["index"] == longest and d["function"]["arguments"]]
    assert len(pieces) > 1 and pieces[0] < len(text) - step


@pytest.mark.parametrize("text, calling", [
    ("Sunny and 21 degrees.", False),
    ('{"answer": 42}', False),  # JSON, but no call: content at the end
    ('{"name": "launch_rockets", "parameters": {}}', False),
    ('{"parameters": {"zone": "Q"}, "name": "get_time"}', True),  # not streamable: judged whole
    ('{"name": "get_time", "arguments": "{\\"zone\\": \\"Z\\"}"}', True),  # arguments as a string
])
def test_replies_that_are_not_streamed_calls(text: str, calling: bool) -> None:
    stream = tooling.CallStream(["get_weather", "get_time"])
    deltas = [d for _, ds in _replay(stream, text, 2) for d in ds]
    assert stream.calling == calling and stream.content == (not calling)
    if calling:
        (call,) = _gathered(deltas)
        assert call["name"] == "get_time" and json.loads(call["arguments"]) == {"zone": ("Q" if "Q" in text else "Z")}
    else:
        assert deltas == [] and stream.text == text
    # prose is released as soon as it cannot be a call
    prose = tooling.CallStream(["get_time"])
    assert prose.feed("Sun") == [] and prose.content


def test_one_call_only_unless_parallel() -> None:
    text = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {}}]'
    stream = tooling.CallStream(["get_weather", "get_time"], parallel=False)
    calls = _gathered([d for _, ds in _replay(stream, text, 4) for d in ds])
    assert [c["name"] for c in calls] == ["get_time"]


def test_a_call_cut_by_the_token_limit_is_what_was_written() -> None:
    stream = tooling.CallStream(["get_time"])
    deltas = stream.feed('{"name": "get_time", "parameters": {"zone": "U') + stream.finish(False)
    (call,) = _gathered(deltas)
    assert stream.calling and call["arguments"] == '{"zone": "U'


@pytest.mark.parametrize("tools, choice, param", [
    ("nope", None, "tools"),
    ([{"type": "retrieval"}], None, "tools.0"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}], None,
     "tools.0.function.parameters"),
    ([WEATHER, WEATHER], None, "tools"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools: object, choice: object, param: str) -> None:
    with pytest.raises(tooling.ToolError) as e:
        tooling.parse_tools(tools, choice)
    assert e.value.param == param and "\n" not in str(e.value)


def test_tools_and_choices() -> None:
    t = tooling.parse_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}},
                            False)
    assert t.choice == "get_time" and not t.parallel and t.names == ["get_weather", "get_time"]
    assert t.grammar() is not None and tooling.parse_tools([WEATHER], "auto").grammar() is None
    # "required": one call, or a list of them when parallel calls are allowed
    call = {"name": "get_time", "parameters": {"zone": "UTC"}}
    for parallel, ok in ((True, [call, [call, call]]), (False, [call])):
        schema = tooling.parse_tools([WEATHER, TIME], "required", parallel).grammar().schema
        for value in (call, [call, call], []):
            if value in ok:
                jsonschema.validate(value, schema)
            else:
                with pytest.raises(jsonschema.ValidationError):
                    jsonschema.validate(value, schema)
    assert tooling.parse_tools([], None) is None


def test_formats_that_cannot_render_tools() -> None:
    spm = load_tokenizer(require_fixture("llama2-tokenizer", "tokenizer.model"))
    with pytest.raises(tooling.ToolError, match=r"chat format \(llama2\) cannot render tools"):
        tooling.tool_format(load_chat_format(spm))
    plain = HFTemplateChatFormat(spm, "{% for m in messages %}{{ m.content }}{% endfor %}", origin="x")
    with pytest.raises(tooling.ToolError, match="template .* does not render tools"):
        tooling.tool_format(plain)


# -- the prompt --------------------------------------------------------------------------------

def llama3_tokenizer():  # noqa: ANN201
    return load_tokenizer(require_fixture("llama3-tokenizer", "tokenizer.model"))


ROUND_TRIP = [
    *QUESTION,
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
]


@pytest.mark.parametrize("messages", [QUESTION, ROUND_TRIP])
def test_prompt_ids_equal_transformers_rendering(messages: list[dict]) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = llama3_tokenizer()
    fmt = tooling.tool_format(load_chat_format(tok))  # Meta's checkpoint: no template of its own
    tools = [WEATHER, TIME]
    ours = fmt.encode_dialog(tooling.template_messages(messages), tools=tools)
    text = render_jinja_template(conversations=[tooling.template_messages(messages)], tools=tools,
                                 chat_template=tooling.LLAMA31_JSON_TOOLS,
                                 add_generation_prompt=True, bos_token="<|begin_of_text|>")
    while isinstance(text, (list, tuple)):  # (rendered conversations, assistant indices)
        text = text[0]
    assert ours == tok.encode_with_special(text)
    rendered = tok.decode(ours)
    assert '"name": "get_weather"' in rendered and "Environment: ipython" in rendered
    if messages is ROUND_TRIP:
        assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
                '"parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>') in rendered
        assert ('<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 21, "sky": '
                '"clear"}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n') in rendered


# -- the server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A tiny random model with Meta's Llama 3 tokenizer, as a Meta folder (no chat template)."""
    folder = tmp_path_factory.mktemp("tiny-llama3")
    params = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 128256,
              "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 500000.0}
    sd = random_meta_state_dict(ModelArgs.from_params(params), seed=1)
    write_meta_folder(folder, params, [sd])
    shutil.copy(require_fixture("llama3-tokenizer", "tokenizer.model"), folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def client(llama3_model: Path) -> Iterator[openai.OpenAI]:
    engine = Engine.load(llama3_model, device="cpu", dtype="float32", max_seq_len=1024, slots=2)
    with running_server(engine) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def test_weather_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="test-model", messages=QUESTION,
                                           tools=[WEATHER, TIME], tool_choice="required", seed=3,
                                           max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    params = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), params)
    messages = [*QUESTION, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    final = client.chat.completions.create(model="test-model", messages=messages,
                                           tools=[WEATHER, TIME], tool_choice="none", seed=3,
                                           max_tokens=8)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)


def _streamed_calls(stream: Iterator) -> tuple[list[dict], str | None, str]:
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = d.id or c["id"]
            c["name"] += (d.function.name or "") if d.function else ""
            c["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[k] for k in sorted(calls)], finish, content


def test_named_function_and_streamed_calls(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = client.chat.completions.create(model="test-model", messages=QUESTION, seed=seed,
                                           tools=[WEATHER, TIME], tool_choice=named, max_tokens=80)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])
        calls, finish, content = _streamed_calls(client.chat.completions.create(
            model="test-model", messages=QUESTION, seed=seed, tools=[WEATHER, TIME],
            tool_choice=named, max_tokens=80, stream=True))
        assert finish == "tool_calls" and content == ""
        assert [c["name"] for c in calls] == ["get_time"]
        assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
        assert calls[0]["id"].startswith("call_")


def test_required_calls_one_or_several_tools(client: openai.OpenAI) -> None:
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(4):
        kw = dict(model="test-model", messages=QUESTION, seed=seed, tools=[WEATHER, TIME],
                  tool_choice="required", max_tokens=160)
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "tool_calls"
        whole = r.choices[0].message.tool_calls
        for call in whole:
            jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
        calls, finish, content = _streamed_calls(client.chat.completions.create(**kw, stream=True))
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            (c.function.name, json.loads(c.function.arguments)) for c in whole]
        one = client.chat.completions.create(**kw, parallel_tool_calls=False)
        assert len(one.choices[0].message.tool_calls) == 1


def test_auto_with_a_random_model_answers_or_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="test-model", messages=QUESTION, tools=[WEATHER],
                                       max_tokens=10, seed=0)
    message = r.choices[0].message
    assert (message.tool_calls is None) == (r.choices[0].finish_reason != "tool_calls")


def test_tools_with_a_format_that_cannot_render_them_is_400(one_thread: None) -> None:
    engine = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=256)
    with running_server(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER])
        assert e.value.body["param"] == "tools" and "cannot render tools" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER],
                                           tool_choice={"type": "function",
                                                        "function": {"name": "nope"}})
        assert e.value.body["param"] == "tool_choice"
        # the server goes on: tool_choice "none" needs no tool rendering
        r = client.chat.completions.create(model="m", messages=QUESTION[1:], tools=[WEATHER],
                                           tool_choice="none", max_tokens=5)
        assert r.choices[0].message.content
