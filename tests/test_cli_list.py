"""`llamarun list` and `--model ORG/NAME` against a fake Hugging Face cache built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamarun.cli import app
from engine_util import one_thread, stories_meta  # noqa: F401
from hf_cache_util import add_to_cache, folder_files


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """./checkpoints with one model, an HF cache with two repos; returns the environment."""
    meta = stories_meta()
    hf = meta.parent / "hf"
    (tmp_path / "work" / "checkpoints").mkdir(parents=True)
    (tmp_path / "work" / "checkpoints" / "stories-meta").symlink_to(meta)
    cache = tmp_path / "cache"
    add_to_cache(cache, "karpathy/stories260K", folder_files(hf))
    add_to_cache(cache, "meta-llama/Stories-Original", folder_files(meta, "original/"))
    monkeypatch.chdir(tmp_path / "work")
    return {"HF_HUB_CACHE": str(cache), "LLAMARUN_MODEL": str(hf)}


def invoke(args: list[str], env: dict[str, str]):  # noqa: ANN201 (typer's Result)
    return CliRunner().invoke(app, args, env=env)


def test_list_json(world: dict[str, str]) -> None:
    r = invoke(["list", "--json"], world)
    assert r.exit_code == 0, r.output
    found = {(e["name"], e["source"]): e for e in json.loads(r.stdout)}
    assert set(found) - {k for k in found if k[1] == "default"} == {
        ("checkpoints/stories-meta", "checkpoints"), (world["LLAMARUN_MODEL"], "LLAMARUN_MODEL"),
        ("karpathy/stories260K", "hf-cache"), ("meta-llama/Stories-Original/original", "hf-cache")}
    hf = found[("karpathy/stories260K", "hf-cache")]
    assert hf["layout"] == "hf" and hf["n_params"] == 292_800 and hf["context"] == 4096
    assert hf["size_bytes"] == sum(f.stat().st_size for f in Path(world["LLAMARUN_MODEL"]).iterdir())
    meta = found[("checkpoints/stories-meta", "checkpoints")]
    assert meta["layout"] == "meta" and meta["n_params"] == 292_800 and meta["error"] is None


def test_list_text_is_plain_and_whole(world: dict[str, str]) -> None:
    r = invoke(["list"], world)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["model", "source", "format", "size", "params", "context"]
    assert all(line == line.rstrip() for line in lines)
    row = next(line for line in lines if line.startswith("karpathy/stories260K "))
    assert row.split()[:3] == ["karpathy/stories260K", "hf-cache", "hf"]
    assert row.split()[4:] == ["KB", "292.80K", "4096"]
    assert any(line.startswith(world["LLAMARUN_MODEL"] + " ") for line in lines)


def test_model_flag_takes_a_cached_repo_id(world: dict[str, str], one_thread: None) -> None:
    base = ["complete", "-p", "Once upon a time", "-t", "0", "-n", "8", "-q", "--dtype", "float32"]
    by_id = invoke([*base, "-m", "karpathy/stories260K"], world)
    by_path = invoke([*base, "-m", world["LLAMARUN_MODEL"]], world)
    assert by_id.exit_code == 0, by_id.output
    assert by_id.stdout == by_path.stdout and by_id.stdout.strip()
    r = invoke(["info", "--json", "-m", "meta-llama/Stories-Original"], world)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layout"] == "meta"


def test_repo_id_not_in_the_cache(world: dict[str, str]) -> None:
    r = invoke(["info", "-m", "meta-llama/Llama-3.2-1B-Instruct"], world)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "`hf download meta-llama/Llama-3.2-1B-Instruct`" in r.stderr


def test_list_with_nothing_to_find(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("llamarun.models_list.embedded_default_model", lambda: (None, "x"))
    r = invoke(["list"], {"HF_HUB_CACHE": str(tmp_path / "none"), "LLAMARUN_MODEL": None})
    assert r.exit_code == 0 and r.stdout == "" and r.stderr.startswith("no models found")
    r = invoke(["list", "--json"], {"HF_HUB_CACHE": str(tmp_path / "none"), "LLAMARUN_MODEL": None})
    assert json.loads(r.stdout) == []


def test_tokenize_takes_a_cached_repo_id(world: dict[str, str]) -> None:
    by_id = invoke(["tokenize", "-m", "karpathy/stories260K", "--json", "Hello"], world)
    by_path = invoke(["tokenize", "-m", world["LLAMARUN_MODEL"], "--json", "Hello"], world)
    assert by_id.exit_code == 0, by_id.output
    assert json.loads(by_id.stdout) == json.loads(by_path.stdout)
