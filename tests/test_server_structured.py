"""`response_format` on the server, driven by the real `openai` client on stories260K: JSON
objects, JSON schemas (the client's `parse` into a pydantic model), streamed or not, and the
400s for schemas that cannot be used, which leave other requests alone."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Literal

import jsonschema
import pytest

from llamarun.engine import Engine
from engine_util import one_thread, stories_meta  # noqa: F401
from server_util import running_server

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "bird"]
    name: str = pydantic.Field(max_length=12)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=150)
    pets: list[Pet] = pydantic.Field(max_length=2)
    happy: bool


SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 10},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["word", "n"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Tell me about Lily."}]


@pytest.fixture(scope="module")
def url(one_thread: None) -> Iterator[str]:
    engine = Engine.load(stories_meta(), device="cpu", dtype="float32", max_seq_len=512, slots=4)
    with running_server(engine) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_parse_into_a_pydantic_model(client: openai.OpenAI) -> None:
    for seed in range(6):
        completion = client.chat.completions.parse(
            model="test-model", messages=MESSAGES, response_format=Person, seed=seed,
            temperature=1.0, max_tokens=300)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)
        assert choice.message.parsed == Person.model_validate_json(choice.message.content)


def test_json_schema_on_completions_and_streamed(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        r = client.completions.create(model="test-model", prompt="Once", seed=seed, max_tokens=100,
                                      extra_body={"response_format": fmt})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
        stream = client.chat.completions.create(model="test-model", messages=MESSAGES, seed=seed,
                                                max_tokens=100, response_format=fmt, stream=True)
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object(client: openai.OpenAI) -> None:
    for seed in range(4):
        r = client.chat.completions.create(model="test-model", messages=MESSAGES, seed=seed,
                                           max_tokens=60, response_format={"type": "json_object"})
        text = r.choices[0].message.content
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":  # (a story model's strings run long)
            assert isinstance(json.loads(text), dict)
    r = client.chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=5,
                                       response_format={"type": "text"}, temperature=0)
    assert r.choices[0].message.content


@pytest.mark.parametrize("fmt, param, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}},
     "response_format.json_schema.schema", 'Unimplemented keys: ["not"]'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
     "response_format.json_schema.schema", "Invalid type: strng"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "format": "colour"}}}}},
     "response_format.json_schema.schema", "Unknown format: colour"),
    ({"type": "json_schema", "json_schema": {"name": "x"}},
     "response_format.json_schema.schema", "is required"),
    ({"type": "json_schema"}, "response_format.json_schema", "must be an object"),
    ({"type": "yaml"}, "response_format.type", "got 'yaml'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 64}
                                         for i in range(4000)}}}},
     "response_format.json_schema.schema", "too large"),
])
def test_bad_response_formats_are_400s_naming_the_field(client: openai.OpenAI, fmt: dict,
                                                        param: str, words: str) -> None:
    for create in (lambda: client.chat.completions.create(model="test-model", messages=MESSAGES,
                                                          max_tokens=5, response_format=fmt),
                   lambda: client.completions.create(model="test-model", prompt="Once", max_tokens=5,
                                                     extra_body={"response_format": fmt})):
        with pytest.raises(openai.BadRequestError) as e:
            create()
        error = e.value.body
        assert e.value.status_code == 400 and error["param"] == param, error
        assert words in error["message"] and "\n" not in error["message"]


def test_bad_schema_does_not_disturb_other_requests(client: openai.OpenAI) -> None:
    free = lambda: client.completions.create(  # noqa: E731
        model="test-model", prompt="Once upon a time", max_tokens=30, temperature=0).choices[0].text
    alone = free()
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}
    good = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}

    def constrained() -> str:
        return client.chat.completions.create(model="test-model", messages=MESSAGES, seed=1,
                                              max_tokens=100, response_format=good
                                              ).choices[0].message.content

    def refused() -> int:
        try:
            client.chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=5,
                                           response_format=bad)
        except openai.BadRequestError as e:
            return e.status_code
        return 200

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        frees = [pool.submit(free) for _ in range(2)]
        goods = [pool.submit(constrained) for _ in range(2)]
        bads = [pool.submit(refused) for _ in range(2)]
        assert [f.result() for f in frees] == [alone, alone]
        for g in goods:
            jsonschema.validate(json.loads(g.result()), SCHEMA)
        assert [b.result() for b in bads] == [400, 400]
