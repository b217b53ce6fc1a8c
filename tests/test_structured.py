"""Structured output (llamarun.structured): grammars checked, masks on real tokenizers, and
seeded samples of stories260K that always parse and validate, through the library and the CLI."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from typer.testing import CliRunner

from llamarun import structured
from llamarun.cli import app
from llamarun.engine import Engine
from llamarun.sampling import SamplingParams
from llamarun.structured import GrammarCompiler, GrammarError
from llamarun.tokenizer import load_tokenizer
from engine_util import engine, one_thread, stories_meta  # noqa: F401
from fixtures_util import require_fixture

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "ok"],
    "additionalProperties": False,
}


def invoke(*args: str, input: str | None = None):  # noqa: ANN201 (typer's Result)
    return CliRunner().invoke(app, list(args), input=input, env={"LLAMARUN_MODEL": None})


def sample(engine: Engine, constraint: object, seed: int, *, n: int = 120, prompt: str = "Once",
           temperature: float = 1.0) -> tuple[str, str]:
    gen = engine.complete(prompt, sampling=SamplingParams(temperature=temperature, top_k=0,
                                                          top_p=1.0, min_p=0.0, seed=seed),
                          max_new_tokens=n, constraint=constraint)
    text = "".join(c.text for c in gen)
    return text, gen.result.finish_reason


def spell(mask: object, tok: object, text: bytes) -> None:
    """Feed `mask` the text as allowed tokens, the longest that fits at each step (where the
    grammar forces bytes, as `": `, it allows their canonical tokens only, so the tokenizer's own
    encoding of a whole text need not be allowed); fail where no allowed token fits."""
    ids: dict[bytes, list[int]] = {}  # (a byte-fallback token and a piece may spell the same)
    for i in range(tok.vocab_size):
        if i not in tok.control_ids:
            ids.setdefault(tok.token_bytes(i), []).append(i)
    longest = max(map(len, ids))
    done = 0
    while done < len(text):
        out = mask(torch.zeros(tok.vocab_size + 7))  # a padded output layer
        assert torch.isinf(out[tok.vocab_size:]).all()
        assert not any(out[c] == 0 for c in tok.control_ids - tok.stop_ids)
        for n in range(min(longest, len(text) - done), 0, -1):
            fit = [i for i in ids.get(text[done:done + n], ()) if out[i] == 0]
            if fit:
                i = fit[0]
                break
        else:
            raise AssertionError(f"no allowed token spells {text[done:]!r}")
        done += n
        mask.push(torch.tensor(i))


def allowed_now(mask: object, tok: object) -> set[int]:
    return set((mask(torch.zeros(tok.vocab_size)) == 0).nonzero().flatten().tolist())


# -- checking grammars (no tokenizer needed) ---------------------------------------------------

@pytest.mark.parametrize("schema, message", [
    ('{"type": "foo"}', "Invalid type: foo"),
    ('{"type": "object", "not": {"type": "string"}}', 'Unimplemented keys: ["not"]'),
    ('{"type": "string", "format": "weird"}', "Unknown format: weird"),
    ('{"properties": {"a": {"$ref": "#/defs/x"}}}', "'/defs/x' does not exist"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ("false", "no output can match it"),
])
def test_bad_schemas_are_one_line_errors(schema: str, message: str) -> None:
    with pytest.raises(GrammarError) as e:
        structured.json_schema(schema)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('root ::= "a" | missing', "Rule 'missing' not found"),
    ('root ::= ("a"', "Expected ')'"),
    ("   ", "is empty"),
])
def test_bad_grammars_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(GrammarError) as e:
        structured.grammar(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_too_large_schema_is_refused_quickly() -> None:
    props = {f"p{i}": {"type": "string", "pattern": "[a-z]{1,30}@[a-z]{2,40}\\.(com|org)"}
             for i in range(10_000)}
    start = time.perf_counter()
    with pytest.raises(GrammarError, match="too large"):
        structured.json_schema({"type": "object", "properties": props})
    assert time.perf_counter() - start < 1.0


def test_schema_just_under_the_cap_compiles_and_masks_in_bounded_time() -> None:
    # ~150 KB: 3000 required properties, each with a pattern (the worst found under the cap;
    # llguidance's limits bound the rest: lexer states, grammar size, work per mask).
    n = 3000
    schema = {"type": "object", "required": [f"k{i}" for i in range(n)],
              "properties": {f"k{i}": {"type": "string", "pattern": "[a-z]{3,9}[0-9]{2}"}
                             for i in range(n)}}
    tok = load_tokenizer(require_fixture("llama3-tokenizer", "tokenizer.model"))
    compiler = GrammarCompiler(tok)
    compiler.constraint(structured.json_object())  # the vocabulary, built once per tokenizer
    start = time.perf_counter()
    mask = compiler.constraint(structured.json_schema(schema)).processor(torch.device("cpu"))
    out = mask(torch.zeros(tok.vocab_size))
    assert time.perf_counter() - start < 5.0
    assert (out == 0).sum() > 0 and not mask.failed


# -- the mask on real tokenizers -----------------------------------------------------------------

@pytest.mark.parametrize("fixture", [("llama3-tokenizer", "tokenizer.model"),
                                     ("llama2-tokenizer", "tokenizer.model")])
def test_mask_follows_a_json_text_then_allows_only_stop_ids(fixture: tuple[str, str]) -> None:
    tok = load_tokenizer(require_fixture(*fixture))
    compiler = GrammarCompiler(tok)
    mask = compiler.constraint(structured.json_schema(PERSON)).processor(torch.device("cpu"))
    spell(mask, tok, b'{"name": "Ann", "age": 7, "pets": ["cat", "dog"], "ok": true}')
    assert allowed_now(mask, tok) == set(tok.stop_ids)
    mask.push(torch.tensor(sorted(tok.stop_ids)[0]))
    assert mask.done


def test_mask_is_applied_on_the_logits_device_and_dtype() -> None:
    tok = load_tokenizer(require_fixture("llama3-tokenizer", "tokenizer.model"))
    mask = GrammarCompiler(tok).constraint(structured.regex("[0-9]{3}")).processor(torch.device("cpu"))
    logits = torch.randn(tok.vocab_size, dtype=torch.bfloat16)
    out = mask(logits)
    assert out.dtype == torch.bfloat16 and out.device == logits.device
    allowed = (out > -torch.inf).nonzero().flatten().tolist()
    assert allowed and all(re.fullmatch(rb"[0-9]{1,3}", tok.token_bytes(i)) for i in allowed)


def test_compiler_caches_matchers_and_is_thread_safe() -> None:
    tok = load_tokenizer(require_fixture("llama2-tokenizer", "tokenizer.model"))
    compiler = GrammarCompiler(tok)
    g = structured.json_schema(PERSON)
    out: list[object] = []
    threads = [threading.Thread(target=lambda: out.append(compiler.constraint(g))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and len(compiler._cache) == 1


# -- generating --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batched(one_thread: None) -> Engine:
    """stories260K with 8 cache slots: generations read in turn are decoded together."""
    return Engine.load(stories_meta(), device="cpu", dtype="float32", slots=8)


def test_seeded_samples_always_validate(batched: Engine) -> None:
    constraint = GrammarCompiler(batched.tokenizer).constraint(structured.json_schema(PERSON))
    gens = [batched.complete("Once", sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0,
                                                             min_p=0.0, seed=seed),
                             max_new_tokens=200, constraint=constraint) for seed in range(48)]
    texts = [""] * len(gens)
    while not all(g.done for g in gens):  # round robin: up to 8 rows decode in each step
        for k, g in enumerate(gens):
            chunk = next(g, None)
            if chunk is not None:
                texts[k] += chunk.text
    for g, text in zip(gens, texts):
        assert g.result.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 40  # samples, not one answer


def test_any_json_object(engine: Engine) -> None:
    compiler = GrammarCompiler(engine.tokenizer)
    constraint = compiler.constraint(structured.json_object())
    for seed in range(10):
        text, reason = sample(engine, constraint, seed, n=40, temperature=0.6)
        assert text.startswith("{")  # (a story model's strings run long: most end by length)
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
    mask = constraint.processor(torch.device("cpu"))
    tok = engine.tokenizer
    spell(mask, tok, b'{"a": [1, {"b": null}], "c": "d"}')
    assert allowed_now(mask, tok) == set(tok.stop_ids)
    with pytest.raises(AssertionError, match="no allowed token"):  # an object, not an array
        spell(constraint.processor(torch.device("cpu")), tok, b"[1]")


def test_gbnf_grammar_and_regex(engine: Engine) -> None:
    compiler = GrammarCompiler(engine.tokenizer)
    gbnf = compiler.constraint(structured.grammar(
        'root ::= answer " because " [a-z ]{1,20} "."\nanswer ::= "yes" | "no"'))
    rx = compiler.constraint(structured.regex(r"[A-Z][a-z]{2,8} [0-9]{1,4}"))
    for seed in range(15):
        text, reason = sample(engine, gbnf, seed)
        assert reason == "stop" and re.fullmatch(r"(yes|no) because [a-z ]{1,20}\.", text), text
        text, reason = sample(engine, rx, seed)
        assert reason == "stop" and re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{1,4}", text), text


def test_constrained_and_free_requests_share_a_batch() -> None:
    torch.set_num_threads(1)
    engine = Engine.load(stories_meta(), device="cpu", dtype="float32", slots=2)
    greedy = SamplingParams.greedy()
    solo = "".join(c.text for c in engine.complete("Once upon a time", sampling=greedy,
                                                   max_new_tokens=40))
    constraint = GrammarCompiler(engine.tokenizer).constraint(structured.json_schema(PERSON))
    free = engine.complete("Once upon a time", sampling=greedy, max_new_tokens=40)
    bound = engine.complete("Lily", sampling=greedy, max_new_tokens=200, constraint=constraint)
    # Both are started before either is read on: from then on each step decodes both rows.
    heads = [next(free).text, next(bound).text]
    assert engine.scheduler.busy != (0, 0)
    free_text = heads[0] + "".join(c.text for c in free)
    bound_text = heads[1] + "".join(c.text for c in bound)
    assert free_text == solo
    jsonschema.validate(json.loads(bound_text), PERSON)


def test_masks_are_computed_while_the_pass_runs() -> None:
    """The scheduler starts each constrained row's next mask before its forward pass (on the
    mask worker thread), and a mask so prepared equals one computed when the logits are in."""
    torch.set_num_threads(1)
    engine = Engine.load(stories_meta(), device="cpu", dtype="float32")
    constraint = GrammarCompiler(engine.tokenizer).constraint(structured.json_schema(PERSON))
    log: list[str] = []

    class Watched:
        def __init__(self) -> None:
            self.inner = constraint.processor(torch.device("cpu"))
            self.twin = constraint.processor(torch.device("cpu"))  # never prepared

        def prepare(self) -> None:
            log.append("prepare")
            self.inner.prepare()

        def __call__(self, logits: torch.Tensor) -> torch.Tensor:
            log.append("mask")
            out = self.inner(logits)
            assert torch.equal(out, self.twin(logits))
            return out

        def push(self, token: torch.Tensor) -> None:
            self.inner.push(token)
            self.twin.push(token)

    class Spy:
        def processor(self, device: torch.device) -> Watched:
            return Watched()

    run = engine.scheduler.runner.run

    def watched_run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        log.append("pass")
        return run(*args, **kwargs)

    engine.scheduler.runner.run = watched_run
    try:
        gen = engine.complete("Lily", sampling=SamplingParams.greedy(), max_new_tokens=60,
                              constraint=Spy())
        text = "".join(c.text for c in gen)
    finally:
        del engine.scheduler.runner.run
    assert text.startswith('{"name": "')
    masks = [i for i, e in enumerate(log) if e == "mask"]
    assert len(masks) == gen.result.completion_tokens
    for i in masks:  # the pass that made these logits ran after the mask was started
        assert log[i - 2:i] == ["prepare", "pass"]


def test_chat_session_takes_a_constraint(engine: Engine) -> None:
    constraint = GrammarCompiler(engine.tokenizer).constraint(structured.json_schema(PERSON))
    chat = engine.chat()
    for message in ("Hi", "Who are you?"):
        gen = chat.send(message, sampling=SamplingParams(temperature=1.0, seed=3),
                        max_new_tokens=200, constraint=constraint)
        text = "".join(c.text for c in gen)
        jsonschema.validate(json.loads(text), PERSON)
    assert len(chat.messages) == 4


# -- the CLI ----------------------------------------------------------------------------------

def test_cli_json_schema_and_grammar_files(tmp_path: Path, one_thread: None) -> None:
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    for seed in range(3):
        r = invoke("complete", "-m", str(stories_meta()), "-p", "Once", "-s", str(seed), "-q",
                   "-n", "200", "--json-schema", str(schema))
        assert r.exit_code == 0, r.output
        jsonschema.validate(json.loads(r.stdout), PERSON)
    gbnf = tmp_path / "yesno.gbnf"
    gbnf.write_text('root ::= ("yes" | "no") "!"\n')
    r = invoke("complete", "-m", str(stories_meta()), "-p", "Once", "-q", "--grammar", str(gbnf))
    assert r.exit_code == 0 and r.stdout in ("yes!\n", "no!\n"), r.output
    r = invoke("complete", "-m", str(stories_meta()), "-p", "Once", "-q", "--json-object",
               "-t", "0", "-n", "300", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["text"].startswith("{") and (out["finish_reason"] == "length"
                                            or isinstance(json.loads(out["text"]), dict))


def test_cli_schema_from_stdin_and_chat(tmp_path: Path, one_thread: None) -> None:
    r = invoke("complete", "-m", str(stories_meta()), "-p", "Once", "-q", "-n", "200", "-s", "1",
               "--json-schema", "-", input=json.dumps(PERSON))
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout), PERSON)
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    r = invoke("chat", "-m", str(stories_meta()), "-n", "200", "-s", "2", "--no-compile",
               "--json-schema", str(schema), input="Hi\nWho are you?\n")
    assert r.exit_code == 0, r.output
    replies = r.stdout.strip().splitlines()
    assert len(replies) == 2
    for line in replies:
        jsonschema.validate(json.loads(line), PERSON)
    r = invoke("chat", "-m", "/no/such/model", "--json-schema", "-", input="Hi\n")
    assert r.exit_code != 0 and "cannot read stdin: chat (its messages) reads it" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--json-schema", "-"], "--json-schema - cannot read stdin: the prompt reads it"),
    (["--json-object", "--grammar", "g.gbnf"], "give one of --json-object / --grammar"),
    (["--json-schema", "/no/such/file.json"], "not found"),
])
def test_cli_flag_errors_are_one_line_before_loading(args: list[str], message: str) -> None:
    r = invoke("complete", "-m", "/no/such/model", *args, input="Once")
    assert r.exit_code != 0
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_cli_invalid_schema_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": "strin"}}}')
    r = invoke("complete", "-m", "/no/such/model", "-p", "x", "--json-schema", str(bad))
    assert r.exit_code != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "Invalid type: strin" in r.stderr and str(bad) in r.stderr
