"""configure_compile_cache: inductor's cache really is ~/.cache/llamarun/inductor, a user's own
TORCHINDUCTOR_CACHE_DIR wins, and with no usable home compiling works without a cache."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401  (sets TORCHINDUCTOR_CACHE_DIR to /tmp/torchinductor_USER)
import torch._inductor.config as inductor_config
from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

from llamarun.device import configure_compile_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh home; the variable as torch's import left it; inductor's switches restored after."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    # Restored by plain assignment: newer pytest's monkeypatch undoes a module attribute that
    # is not in the module's __dict__ (inductor's config answers through __getattr__) with
    # delattr, which hides the setting for the rest of the process.
    saved = inductor_config.fx_graph_cache, inductor_config.autotune_local_cache
    yield home
    inductor_config.fx_graph_cache, inductor_config.autotune_local_cache = saved


def test_torch_default_is_replaced_by_ours(env: Path) -> None:
    folder = configure_compile_cache()
    assert folder == env / ".cache" / "llamarun" / "inductor" and folder.is_dir()
    assert cache_dir() == str(folder)  # what inductor itself will use
    assert configure_compile_cache() == folder  # a second call changes nothing
    assert inductor_config.fx_graph_cache is True


def test_xdg_cache_home_absolute_only(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert configure_compile_cache() == tmp_path / "xdg" / "llamarun" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says: ignore it
    assert configure_compile_cache() == env / ".cache" / "llamarun" / "inductor"


def test_the_users_own_folder_wins(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
    assert configure_compile_cache() == mine
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(mine)
    assert not (env / ".cache").exists()


@pytest.mark.parametrize("home", ["a file", "unwritable", "none"])
def test_no_usable_home_compiles_without_a_cache(env: Path, monkeypatch: pytest.MonkeyPatch,
                                                 home: str) -> None:
    if home == "a file":
        (env / "f").write_text("")
        monkeypatch.setenv("HOME", str(env / "f"))
    elif home == "unwritable":
        if os.geteuid() == 0:  # root writes anywhere: a read-only home needs another way
            monkeypatch.setattr(os, "access", lambda *a, **k: False)
        else:
            env.chmod(0o500)
    else:
        monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(
            RuntimeError("Could not determine home directory."))))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    # On the logger itself: a CLI test earlier in the run may have stopped llamarun's loggers
    # propagating to the root, where caplog listens.
    logger = logging.getLogger("llamarun.device")
    logger.addHandler(handler)
    try:
        assert configure_compile_cache() is None
    finally:
        logger.removeHandler(handler)
    env.chmod(0o700)
    private = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert private.name.startswith("llamarun-inductor-") and private.is_dir()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and cache_dir() == str(private)
    assert inductor_config.fx_graph_cache is False and inductor_config.autotune_local_cache is False
    notes = [r.getMessage() for r in records]
    assert len(notes) == 1 and "compiling without a compile cache" in notes[0], notes
    assert configure_compile_cache() is None  # a second call: still none, no second folder


_COMPILE = """
import torch, torch._dynamo
from llamarun.device import configure_compile_cache
configure_compile_cache()
f = torch.compile(lambda x: x * 2 + 1)
assert f(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
"""


@pytest.mark.slow
def test_a_real_compile_writes_into_our_folder(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("XDG_CACHE_HOME", None)
    subprocess.run([sys.executable, "-c", _COMPILE], env=env, check=True, timeout=300)
    ours = tmp_path / ".cache" / "llamarun" / "inductor"
    assert (ours / "fxgraph").is_dir() and any(ours.rglob("*.py"))
    # Nothing in the shared default (importing torch._dynamo makes that folder, empty).
    assert [p for p in (tmp_path / "tmp").rglob("*") if not p.is_dir()] == []
