"""Sliding-window perplexity (library and `llamarun perplexity`) on the real stories260K model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from llamarun.cli import app
from llamarun.engine import Engine
from llamarun.errors import InvalidArgumentError
from llamarun.perplexity import default_text, perplexity, plan_windows
from engine_util import engine, one_thread, run_cli, stories_meta  # noqa: F401
from fixtures_util import require_fixture

STORY = ("Once upon a time, there was a little girl named Lily. She liked to play outside with "
         "her big red ball. One day, she saw a cat in the park and they became good friends. ")


def story_ids(engine: Engine, repeats: int = 3) -> list[int]:
    return engine.tokenizer.encode(STORY * repeats, bos=True)


@pytest.fixture(scope="module")
def hf_model():  # noqa: ANN201 (transformers' LlamaForCausalLM)
    """stories260K's Hugging Face folder in transformers, in float32: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(require_fixture("stories260K", "hf"),
                                                torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_engine(one_thread: None) -> Engine:  # noqa: F811
    """The same folder in llamarun (its weights are stored bf16: the Meta file's differ)."""
    return Engine.load(require_fixture("stories260K", "hf"), device="cpu", dtype="float32")


def reference_nll(hf_model, ids: list[int], ctx: int, stride: int) -> float:  # noqa: ANN001
    """The Hugging Face perplexity guide's loop with transformers' own loss: -100 labels,
    the mean loss of each window weighted by its scored tokens."""
    labels_all = torch.tensor(ids)
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, len(ids), stride):
            end = min(begin + ctx, len(ids))
            trg_len = end - prev_end
            window = labels_all[begin:end]
            labels = window.clone()
            labels[:-trg_len] = -100
            loss = hf_model(input_ids=window[None], labels=labels[None]).loss
            n_valid = int((labels[1:] != -100).sum())
            nll_sum += float(loss) * n_valid
            n_scored += n_valid
            prev_end = end
            if end == len(ids):
                break
    return nll_sum / n_scored


@pytest.mark.parametrize(("ctx", "stride"), [(32, 16), (48, 20), (40, 40), (64, 1)])
def test_matches_transformers_loss(hf_engine: Engine, hf_model, ctx: int, stride: int) -> None:  # noqa: ANN001
    ids = story_ids(hf_engine)[:130]
    r = perplexity(hf_engine, ids, ctx=ctx, stride=stride)
    expected = reference_nll(hf_model, ids, ctx, stride)
    assert r.nll == pytest.approx(expected, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert r.n_windows == len(plan_windows(len(ids), ctx=ctx, stride=stride))
    assert (r.ctx, r.stride) == (ctx, stride)
    if stride < ctx:
        assert r.n_tokens_scored == len(ids) - 1  # every token but the first, exactly once


def test_one_window_is_transformers_loss(hf_engine: Engine, hf_model) -> None:  # noqa: ANN001
    ids = story_ids(hf_engine, 1)
    assert len(ids) < 100
    r = perplexity(hf_engine, ids, ctx=100, stride=100)
    with torch.inference_mode():
        ce = hf_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert r.n_windows == 1 and r.n_tokens_scored == len(ids) - 1
    assert r.perplexity == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_stories_beat_random_ids(engine: Engine) -> None:
    ids = story_ids(engine, 4)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(3, engine.args.vocab_size, (len(ids),), generator=g).tolist()
    story = perplexity(engine, ids, ctx=64).perplexity
    random = perplexity(engine, noise, ctx=64).perplexity
    assert story < random / 2, (story, random)


def test_default_stride_truncation_and_progress(engine: Engine) -> None:
    ids = story_ids(engine, 4)
    calls: list[tuple[int, int]] = []
    r = perplexity(engine, ids, ctx=32, max_tokens=100,
                   progress=lambda done, total: calls.append((done, total)))
    again = perplexity(engine, ids[:100], ctx=32, stride=16)
    assert r.stride == 16 and r.nll == again.nll and r.n_tokens_scored == 99
    assert len(calls) == r.n_windows and calls[-1] == (100, 100)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # Tokens run through the model (windows overlap) over the time taken.
    run = sum(w.end - w.begin for w in plan_windows(100, ctx=32, stride=16))
    assert r.tokens_per_s == pytest.approx(run / r.seconds)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ctx": 513}, "exceeds the model's KV cache of 512"),
    ({"ctx": 1}, "ctx must be at least 2"),
    ({"ctx": 8, "stride": 0}, "stride must be between 1 and ctx"),
    ({"ctx": 8, "stride": 9}, "stride must be between 1 and ctx"),
    ({"ctx": 8, "max_tokens": 1}, "max_tokens must be at least 2"),
])
def test_bad_settings(engine: Engine, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        perplexity(engine, story_ids(engine), **kwargs)


def test_too_few_or_bad_tokens(engine: Engine) -> None:
    with pytest.raises(InvalidArgumentError, match="at least 2 tokens"):
        perplexity(engine, [1], ctx=8)
    with pytest.raises(InvalidArgumentError, match=r"token ids must lie in \[0, 512\)"):
        perplexity(engine, [1, 600], ctx=8)


def test_default_text_is_fixed_and_long() -> None:
    text = default_text()
    assert text == default_text()
    assert len(text) > 50_000 and "Assert statements are a convenient way" in text


def _cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, ["perplexity", "-m", str(stories_meta()), "--dtype", "float32",
                                    *args], input=input, env={"LLAMARUN_MODEL": None})


def test_cli_json_matches_library(engine: Engine) -> None:
    # --dtype float32: `auto` may mean bfloat16 on CPUs with native bf16.
    r = run_cli("perplexity", "--model", str(stories_meta()), "--ctx", "64", "--max-tokens", "300",
                "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    ids = engine.tokenizer.encode(default_text(), bos=engine.tokenizer.add_bos)
    lib = perplexity(engine, ids, ctx=64, max_tokens=300)
    assert data["perplexity"] == pytest.approx(lib.perplexity, rel=1e-5)
    assert data["nll"] == pytest.approx(lib.nll, rel=1e-5)
    assert (data["n_tokens_scored"], data["n_windows"], data["ctx"], data["stride"]) == (
        299, lib.n_windows, 64, 32)
    assert data["dtype"] == "float32" and data["model"].endswith("meta")
    run = sum(w.end - w.begin for w in plan_windows(300, ctx=64, stride=32))
    assert data["tokens_per_s"] * data["seconds"] == pytest.approx(run, rel=1e-3)


def test_cli_stdin_and_text_line(engine: Engine) -> None:
    r = _cli("-", "--ctx", "32", input=STORY * 3)
    assert r.exit_code == 0, r.output
    ids = story_ids(engine)  # the SentencePiece tokenizer adds BOS
    lib = perplexity(engine, ids, ctx=32)
    line = r.stdout.strip()
    assert line.startswith(f"perplexity {lib.perplexity:.3f}  ({len(ids) - 1} tokens in "), line
    assert "windows of ctx 32, stride 16; " in line and line.endswith(" tok/s)")


def test_cli_file_and_ctx_capped(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "story.txt"
    path.write_text(STORY * 3, encoding="utf-8")
    r = _cli(str(path), "--ctx", "64", "--max-seq-len", "32", "--json")
    assert r.exit_code == 0, r.output
    assert "--ctx 64 exceeds the KV cache of 32 tokens: using 32" in r.stderr
    data = json.loads(r.stdout)
    assert (data["ctx"], data["stride"]) == (32, 16)
    lib = perplexity(engine, story_ids(engine), ctx=32)
    assert data["perplexity"] == pytest.approx(lib.perplexity, rel=1e-5)


@pytest.mark.parametrize("args", [["missing.txt"], ["-", "--stride", "0"], ["-", "--ctx", "1"]])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    r = _cli(*[str(tmp_path / a) if a.endswith(".txt") else a for a in args], input=STORY)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""


def test_cli_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    r = _cli(str(path))
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "not UTF-8" in r.stderr
