"""Fuzz suite (issue 9): mutated safetensors headers, GGUF headers and metadata, params.json and
config.json, tokenizer files, chat templates, prompts, flags and HTTP request bodies. Every case must end in a correct result or a
LlamarunError, in a worker process with an address-space limit and an alarm (harness.py).

The default run makes a few dozen cases per target; `LLAMARUN_FUZZ_EXAMPLES=1500 python -m
pytest tests/fuzz` makes that many per target (about 10,000 in all).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import TALLY, Worker, check
from llamarun.config import ModelArgs
from fixtures_util import require_fixture
from gguf_util import write_llama_gguf
from model_util import hf_config, random_meta_state_dict, write_hf_folder, write_meta_folder

EXAMPLES = int(os.environ.get("LLAMARUN_FUZZ_EXAMPLES", "0")) or None


def examples(default: int) -> settings:
    return settings(max_examples=EXAMPLES or default, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64,
                 head_dim=8, max_seq_len=64)
PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
          "multiple_of": 32, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_seq_len": 64}


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("seeds")
    sd = random_meta_state_dict(ARGS, seed=5)
    types = {n: (QT.Q8_0 if t.dim() == 2 else QT.F32) for n, t in sd.items()}
    return {"hf": write_hf_folder(base / "hf", ARGS, sd),
            "meta": write_meta_folder(base / "meta", PARAMS, [sd]),
            "gguf": write_llama_gguf(base / "m.gguf", sd, ARGS, types)}


def fresh(tmp: Path, name: str, source: Path) -> Path:
    """A copy of the seed `source` at tmp/name (replacing the last case's)."""
    target = tmp / name
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target


# --- strategies -----------------------------------------------------------------------------

SPECIAL_INTS = st.sampled_from([0, -1, 1, 2, 3, 7, 8, 64, 2**31, 2**32 + 1, 2**63, 10**7,
                                10**9, 10**30, -2**63])
SCALARS = (st.none() | st.booleans() | SPECIAL_INTS | st.integers(-10**6, 10**6)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def mutated_json(draw: st.DrawFn, base: dict, keys: list[str]) -> bytes:
    """base with some keys deleted, retyped or added; sometimes raw garbage or deep nesting."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return ('{"a": ' + nested(draw(st.integers(500, 50_000))) + "}").encode()
    data = dict(base)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys) | st.text(max_size=10))
        if draw(st.booleans()) and key in data:
            del data[key]
        else:
            data[key] = draw(JSON_VALUES)
    return json.dumps(data).encode()


def flip_bytes(draw: st.DrawFn, data: bytes, region: int) -> bytes:
    """Overwrite a few bytes in the first `region` bytes, or truncate."""
    buf = bytearray(data)
    if draw(st.integers(0, 4)) == 0:
        return bytes(buf[:draw(st.integers(0, min(len(buf), region)))])
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, min(len(buf), region) - 1))
        buf[pos] = draw(st.integers(0, 255))
    return bytes(buf)


# --- targets --------------------------------------------------------------------------------

HF_KEYS = list(hf_config(ARGS)) + ["rope_scaling", "rope_parameters", "attention_bias",
                                   "model_type", "hidden_act"]


@examples(60)
@given(data=st.data())
def test_fuzz_config_json(worker: Worker, seeds: dict, tmp_path_factory, data) -> None:  # noqa: ANN001
    folder = fresh(tmp_path_factory.getbasetemp(), "cfg", seeds["hf"])
    base = json.loads((seeds["hf"] / "config.json").read_text())
    (folder / "config.json").write_bytes(data.draw(mutated_json(base, HF_KEYS)))
    case = {"target": "checkpoint", "path": str(folder)}
    check(worker.run(case), case)


@examples(40)
@given(data=st.data())
def test_fuzz_params_json(worker: Worker, seeds: dict, tmp_path_factory, data) -> None:  # noqa: ANN001
    folder = fresh(tmp_path_factory.getbasetemp(), "params", seeds["meta"])
    keys = list(PARAMS) + ["use_scaled_rope", "rope_scaling_factor", "head_dim", "moe_args"]
    (folder / "params.json").write_bytes(data.draw(mutated_json(PARAMS, keys)))
    case = {"target": "checkpoint", "path": str(folder)}
    check(worker.run(case), case)


@st.composite
def safetensors_bytes(draw: st.DrawFn, original: bytes) -> bytes:
    (n,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8:8 + n])
    body = original[8 + n:]
    if draw(st.integers(0, 3)) == 0:
        return flip_bytes(draw, original, 8 + n)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if not isinstance(header[name], dict):
            header[name] = {}
        if field is None:
            header[name] = draw(JSON_VALUES)
        elif field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(
                ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "I64", "Q4", ""]))
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(SPECIAL_INTS | st.integers(0, 128), max_size=4))
        else:
            header[name]["data_offsets"] = draw(st.lists(SPECIAL_INTS | st.integers(0, 10**6),
                                                         max_size=3))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@examples(60)
@given(data=st.data())
def test_fuzz_safetensors_header(worker: Worker, seeds: dict, tmp_path_factory, data) -> None:  # noqa: ANN001
    folder = fresh(tmp_path_factory.getbasetemp(), "st", seeds["hf"])
    original = (seeds["hf"] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data.draw(safetensors_bytes(original)))
    case = {"target": "checkpoint", "path": str(folder), "dtype": data.draw(
        st.sampled_from(["float32", "bfloat16"]))}
    check(worker.run(case), case)


GGUF_KEYS = ["llama.embedding_length", "llama.block_count", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.context_length",
             "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.dimension_count", "llama.vocab_size", "llama.rope.scaling.type",
             "llama.rope.scaling.factor", "llama.expert_count", "general.alignment",
             "general.architecture", "llama.attention.key_length"]


@st.composite
def gguf_case(draw: st.DrawFn, seed: Path, out: Path) -> Path:
    if draw(st.booleans()):
        original = seed.read_bytes()
        out.write_bytes(flip_bytes(draw, original, draw(st.sampled_from([64, 512, 4096]))))
        return out
    import gguf

    sd = random_meta_state_dict(ARGS, seed=5)
    overrides = {draw(st.sampled_from(GGUF_KEYS)): draw(
        st.tuples(st.sampled_from(["u32", "i32", "f32", "str", "bool", "u64", "arr"]),
                  SPECIAL_INTS | st.floats(allow_nan=True, allow_infinity=True, width=32)))
        for _ in range(draw(st.integers(1, 3)))}

    def extra(w: gguf.GGUFWriter) -> None:
        for key, (kind, value) in overrides.items():
            w.kv_data[0].pop(key, None)
            number = value if isinstance(value, (int, float)) else 0
            if kind == "str":
                w.add_string(key, str(value))
            elif kind == "bool":
                w.add_bool(key, bool(value))
            elif kind == "f32":
                w.add_float32(key, float(number))
            elif kind == "arr":
                w.add_array(key, [int(number) % 2**31] * 3)
            elif kind in ("u32", "i32", "u64") and isinstance(number, int):
                lo, hi = {"u32": (0, 2**32), "i32": (-2**31, 2**31), "u64": (0, 2**64)}[kind]
                if lo <= number < hi:
                    getattr(w, f"add_{'uint32' if kind == 'u32' else 'int32' if kind == 'i32' else 'uint64'}")(key, number)

    types = {n: draw(st.sampled_from([QT.F32, QT.F16, QT.Q8_0, QT.Q4_0])) if t.dim() == 2
             else QT.F32 for n, t in sd.items()}
    try:
        return write_llama_gguf(out, sd, ARGS, types, extra=extra)
    except Exception:  # noqa: BLE001 (a combination gguf-py itself refuses to write)
        shutil.copyfile(seed, out)
        return out


@examples(60)
@given(data=st.data())
def test_fuzz_gguf(worker: Worker, seeds: dict, tmp_path_factory, data) -> None:  # noqa: ANN001
    path = data.draw(gguf_case(seeds["gguf"], tmp_path_factory.getbasetemp() / "f.gguf"))
    case = {"target": "checkpoint", "path": str(path),
            "quantize": data.draw(st.sampled_from(["auto", "none", "int8", "int4"]))}
    check(worker.run(case), case)


@examples(40)
@given(data=st.data())
def test_fuzz_tokenizer_files(worker: Worker, tmp_path_factory, data) -> None:  # noqa: ANN001
    hf = require_fixture("stories260K", "hf")
    name = data.draw(st.sampled_from(["tokenizer.json", "tokenizer.model"]))
    original = (hf / name).read_bytes()
    tmp = tmp_path_factory.getbasetemp() / "tok"
    tmp.mkdir(exist_ok=True)
    path = tmp / name
    if name == "tokenizer.json" and data.draw(st.booleans()):
        base = json.loads(original)
        path.write_bytes(data.draw(mutated_json(base, list(base))))
    else:
        path.write_bytes(flip_bytes(data.draw, original, len(original)))
    case = {"target": "tokenizer", "path": str(path),
            "text": data.draw(st.text(max_size=40) | st.sampled_from(["<s></s>", "<unk>"]))}
    check(worker.run(case), case)


@examples(60)
@given(text=st.text(max_size=200) | st.sampled_from([
    "\udcff\udcfe", "<s>[INST]", "<|im_start|>system", "\x00\x1b[2J", "a" * 5000]))
def test_fuzz_prompts(worker: Worker, text: str) -> None:
    model = str(require_fixture("stories260K", "meta"))
    case = {"target": "prompt", "model": model, "text": text, "timeout": 30}
    check(worker.run(case), case)


# Pieces of Jinja chat templates, put together at random: loops, recursion, big operators,
# filters, attribute access and message fields, well or badly formed.
TEMPLATE_PIECES = st.sampled_from([
    "{% for m in messages %}", "{% endfor %}", "{{ m['role'] }}", "{{ m['content'] }}",
    "{{ m.content | trim }}", "<|im_start|>", "<|im_end|>\n", "{% if add_generation_prompt %}",
    "{% endif %}", "{{ 7 ** 99999999 }}", "{{ 'A' * 10**9 }}", "{% for i in range(10**8) %}x",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ ''.__class__.__mro__ }}",
    "{{ messages | tojson(indent=10**6) }}", "{{ raise_exception('no') }}", "{{ bos_token }}",
    "{% set x = namespace(a=1) %}", "{{ x.a }}", "{{", "}}", "{%", "%}", "{# c #}", "text",
    "{{ m.content[::-1] }}", "{{ (m.content ~ m.content) * 1000 }}", "{{ messages[0] }}",
    "{{ lipsum(10**6) }}", "{{ range(5) | list }}", "{{ '%999999999s' % 'a' }}", "\udcff",
])
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.text(max_size=30) | st.sampled_from(["<|im_end|>", "<s>", "{{ 1 }}", ""])}),
    min_size=1, max_size=4)


@examples(60)
@given(pieces=st.lists(TEMPLATE_PIECES, min_size=1, max_size=8), messages=MESSAGES)
def test_fuzz_chat_templates(worker: Worker, pieces: list[str], messages: list[dict]) -> None:
    tokenizer = str(require_fixture("stories260K", "hf"))
    case = {"target": "template", "tokenizer": tokenizer, "template": "".join(pieces),
            "messages": messages, "timeout": 20}
    check(worker.run(case), case)


# Requests to the OpenAI server's application (in process, no socket): mutated chat and
# completion bodies, raw bytes, deep nesting, lone surrogates, odd routes and methods, bodies
# handed over in pieces, wrong Content-Length headers. Any answer but a result or a 4xx in
# OpenAI's error shape is a finding (worker._http_case).
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION_BODY = {"model": "m", "prompt": "Once", "max_tokens": 2}
BODY_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "top_k", "min_p", "repeat_penalty", "stop", "seed", "stream",
             "stream_options", "n", "logprobs", "top_logprobs", "echo", "presence_penalty"]
ROUTES = st.sampled_from([("POST", "/v1/chat/completions")] * 4 + [("POST", "/v1/completions")] * 4
                         + [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/v1/completions"),
                            ("POST", "/v1/nope"), ("PUT", "/v1/models"), ("POST", "/%1b[2J")])
ODD_TEXT = st.sampled_from(["\ud800", "a\udcffb", "\ud83d", "<|im_end|>", "</s>", "\x00",
                            "\u00e9" * 3, "", "\U0001f600"])


@st.composite
def http_body(draw: st.DrawFn, base: dict) -> bytes:
    if draw(st.integers(0, 3)):
        return draw(mutated_json(base, BODY_KEYS))
    data = dict(base)
    text = draw(st.text(max_size=20)) + draw(ODD_TEXT) + draw(st.text(max_size=5))
    if "messages" in data:
        data["messages"] = [{"role": draw(st.sampled_from(["user", "system", "developer"])),
                             "content": text}]
    else:
        data["prompt"] = text
    if draw(st.booleans()):
        data["stop"] = [draw(ODD_TEXT)]
    data["stream"] = draw(st.booleans())
    return json.dumps(data).encode()  # lone surrogates as "\\ud800", as broken clients send them


@examples(60)
@given(data=st.data())
def test_fuzz_http_bodies(worker: Worker, data) -> None:  # noqa: ANN001
    model = str(require_fixture("stories260K", "meta"))
    method, path = data.draw(ROUTES)
    body = data.draw(http_body(CHAT_BODY if "chat" in path else COMPLETION_BODY))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=3)))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    headers = [["content-type", data.draw(st.sampled_from(["application/json", "text/plain"]))]]
    if data.draw(st.booleans()):
        headers.append(["content-length", data.draw(st.sampled_from(
            [str(len(body)), "0", "-1", "abc", "99999999999", ""]))])
    case = {"target": "http", "model": model, "method": method, "path": path,
            "headers": headers, "parts": [p.decode("latin-1") for p in parts], "timeout": 20}
    check(worker.run(case), case)


FLAGS = ["-n", "-t", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--seed",
         "--max-seq-len", "--dtype", "--device", "--quantize", "--group-size", "--stop"]
FLAG_VALUES = st.sampled_from(["0", "-1", "1", "2", "nan", "inf", "-inf", "1e400", "abc", "",
                               "10" * 20, "bf16", "cuda:7", "int4", "64", "\x1b[31m", "\udcff"])


@examples(30)
@given(command=st.sampled_from(["complete", "chat", "bench", "info", "tokenize"]),
       flags=st.lists(st.tuples(st.sampled_from(FLAGS), FLAG_VALUES), max_size=3))
def test_fuzz_flags(worker: Worker, command: str, flags: list[tuple[str, str]]) -> None:
    model = str(require_fixture("stories260K", "meta"))
    if command == "tokenize":
        args = [command, "-m", model, "hello"]
    else:
        args = [command, "-m", model] + [x for f in flags for x in f]
        args += {"complete": ["-p", "Once", "-n", "2"], "chat": ["-n", "2"],
                 "bench": ["-p", "4", "-g", "2", "-r", "1"], "info": []}[command]
    case = {"target": "cli", "args": args, "input": "Hi\n", "timeout": 60}
    check(worker.run(case), case)


def test_fuzz_tally_printed() -> None:
    """Not a fuzz case: the summary line (conftest.py) counts the cases by target and ending."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("fuzz_conftest", Path(__file__).with_name("conftest.py"))
    assert spec is not None and spec.loader is not None
    summary = module_from_spec(spec)
    spec.loader.exec_module(summary)
    lines: list[str] = []

    class Reporter:
        write_line = staticmethod(lines.append)

    saved = dict(TALLY)
    TALLY.clear()
    TALLY.update({"prompt:error": 1, "cli:ok": 2})
    try:
        summary.pytest_terminal_summary(Reporter(), 0, None)
    finally:
        TALLY.clear()
        TALLY.update(saved)
    assert lines == ["fuzz: 3 cases (cli:ok 2, prompt:error 1)"]


_ = torch  # torch is imported before hypothesis starts timing the first case
