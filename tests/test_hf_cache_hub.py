"""The Hugging Face cache as huggingface_hub itself writes it, and caches that are not sound:
resolution stays inside the cache, and one bad repository does not hide the others."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir

from llamarun.config import ModelArgs
from llamarun.errors import CheckpointError
from llamarun.hf_cache import RepoRef, read_ref, resolve_repo, scan_cache
from llamarun.models_list import find_models
from llamarun.resolve import resolve_model
from hf_cache_util import hub_write
from model_util import random_meta_state_dict, write_hf_folder

ARGS = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64,
                 head_dim=8, max_seq_len=64)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = write_hf_folder(tmp_path_factory.mktemp("ck") / "hf", ARGS,
                             random_meta_state_dict(ARGS, seed=1))
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def no_default() -> tuple[Path | None, str]:
    return None, "none"


def test_a_cache_huggingface_hub_wrote(tmp_path: Path, checkpoint: dict[str, bytes]) -> None:
    snap = hub_write(tmp_path, "org/tiny", checkpoint)
    hub_write(tmp_path, "org/tiny", {"config.json": checkpoint["config.json"]}, commit=COMMIT2,
              revision="v2")
    hub_write(tmp_path, "org/gguf", {"sub/m.gguf": b"GGUF"}, commit=COMMIT2)
    r = resolve_model("org/tiny", env={"HF_HUB_CACHE": str(tmp_path)}, cwd=tmp_path,
                      default=no_default)
    assert r.path == snap and (snap / "config.json").is_symlink()
    assert (r.path / "config.json").read_bytes() == checkpoint["config.json"]
    assert resolve_repo(RepoRef("org/tiny", "v2"), tmp_path).name == COMMIT2
    assert resolve_repo(RepoRef("org/tiny", COMMIT2), tmp_path).name == COMMIT2  # a commit given
    assert resolve_repo(RepoRef("org/gguf", sub="sub/m.gguf"), tmp_path).read_bytes() == b"GGUF"
    # What llamarun finds is what huggingface_hub's own scan finds.
    ours = {(s.repo_id, s.revision, s.commit, s.path) for s in scan_cache(tmp_path)}
    theirs = {(repo.repo_id, ref, rev.commit_hash, rev.snapshot_path)
              for repo in scan_cache_dir(tmp_path).repos for rev in repo.revisions
              for ref in rev.refs}
    assert ours == theirs and len(ours) == 3
    names = [e.name for e in find_models(env={"HF_HUB_CACHE": str(tmp_path)}, cwd=tmp_path,
                                         default=no_default)]
    assert names == ["org/tiny"]  # v2 holds no weights; a .gguf in a sub-folder is not looked for


def bad_repos(cache: Path, checkpoint: dict[str, bytes]) -> dict[str, str]:
    """Repositories whose refs/main is not sound, and the message each must give."""
    outside = cache.parent / "outside"
    outside.mkdir(exist_ok=True)
    cases = {}

    def repo(name: str) -> Path:
        hub_write(cache, f"bad/{name}", {"config.json": checkpoint["config.json"]})
        return cache / f"models--bad--{name}"

    (repo("bytes") / "refs" / "main").write_bytes(b"\xff\xfe\x00" * 10)
    cases["bad/bytes"] = "refs file is not UTF-8 text"
    with open(repo("huge") / "refs" / "main", "wb") as f:
        f.truncate(10 << 30)  # 10 GiB, sparse: never read
    cases["bad/huge"] = "refs file is 10240 MiB, larger than the 1,024 bytes"
    main = repo("fifo") / "refs" / "main"
    main.unlink()
    os.mkfifo(main)
    cases["bad/fifo"] = "refs file is a FIFO"
    (repo("path") / "refs" / "main").write_text("../../../../etc")
    cases["bad/path"] = "not a commit hash ('../../../../etc')"
    (repo("missing") / "refs" / "main").write_text(COMMIT2)
    cases["bad/missing"] = f"names commit {COMMIT2}, which has no snapshot"
    folder = repo("escape")
    (folder / "refs" / "main").write_text(COMMIT2)
    (folder / "snapshots" / COMMIT2).symlink_to(outside)
    cases["bad/escape"] = "points outside the cached repository"
    return cases


def test_one_bad_repository_does_not_hide_the_others(tmp_path: Path,
                                                     checkpoint: dict[str, bytes]) -> None:
    cache = tmp_path / "cache"
    hub_write(cache, "good/model", checkpoint)
    cases = bad_repos(cache, checkpoint)
    hub_write(cache, "zz/red", checkpoint)
    (cache / "models--zz--red").rename(cache / "models--zz--\x1b[31mred")  # escape codes in a name
    entries = find_models(env={"HF_HUB_CACHE": str(cache)}, cwd=tmp_path, default=no_default)
    by_name = {e.name: e for e in entries}
    assert by_name["good/model"].error is None and by_name["good/model"].n_params is not None
    assert by_name["zz/red"].error is None  # the escape sequence is gone
    for name, message in cases.items():
        assert message in (by_name[name].error or ""), (name, by_name[name].error)
        assert "\n" not in by_name[name].error
    for name, message in cases.items():  # resolving one is the same one line
        with pytest.raises(CheckpointError) as e:
            resolve_repo(RepoRef(name), cache)
        assert message in str(e.value) or "not in the Hugging Face cache" in str(e.value)


def test_links_out_of_the_repository_are_refused(tmp_path: Path,
                                                 checkpoint: dict[str, bytes]) -> None:
    snap = hub_write(tmp_path, "org/m", checkpoint)
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF")
    (snap / "x.gguf").symlink_to(secret)
    with pytest.raises(CheckpointError, match="x.gguf: points outside the cached repository"):
        resolve_repo(RepoRef("org/m", sub="x.gguf"), tmp_path)
    with pytest.raises(CheckpointError, match="x.gguf: points outside the cached repository"):
        resolve_repo(RepoRef("org/m"), tmp_path)
    meta = hub_write(tmp_path, "org/meta", {"original/params.json": b"{}"})
    (meta / "original" / "consolidated.00.pth").symlink_to(secret)  # Meta's files only
    with pytest.raises(CheckpointError, match="consolidated.00.pth: points outside the cached"):
        resolve_repo(RepoRef("org/meta"), tmp_path)


def test_read_ref(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    assert read_ref(tmp_path, "main") is None
    (tmp_path / "refs" / "main").write_text(COMMIT + "\n")
    assert read_ref(tmp_path, "main") == COMMIT
    (tmp_path / "refs" / "main").write_text(COMMIT.upper())
    with pytest.raises(CheckpointError, match="not a commit hash"):
        read_ref(tmp_path, "main")
