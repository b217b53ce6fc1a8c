"""Every environment variable llamarun reads is in this file's table, and a bad value of each is
one `error:` line naming the variable (never a traceback, never silently ignored)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llamarun.errors import InvalidArgumentError
from fixtures_util import require_fixture

REPO = Path(__file__).resolve().parent.parent

# Variables whose every value is usable: folders (a missing one is reported where it is used),
# the API key (any text; serve checks it), and the marker the --tp launcher sets for its ranks.
ANY_VALUE = {"HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME",
             "TORCHINDUCTOR_CACHE_DIR", "LLAMARUN_API_KEY", "LLAMARUN_TP_LAUNCHED"}
# A bad value, the command line it is given to, and what its one error line says.
BAD = {
    "LLAMARUN_COMPILE": ("maybe", [], "LLAMARUN_COMPILE"),
    "LLAMARUN_TP_TIMEOUT": ("abc", ["--tp", "2"], "LLAMARUN_TP_TIMEOUT must be a number of seconds"),
    "WORLD_SIZE": ("two", [], "WORLD_SIZE, RANK and LOCAL_RANK must be integers"),
    "RANK": ("9", [], "RANK 9 is not in 0..1"),  # (with WORLD_SIZE=2)
    "LOCAL_RANK": ("x", [], "WORLD_SIZE, RANK and LOCAL_RANK must be integers"),
    "LOCAL_WORLD_SIZE": ("abc", [], "LOCAL_WORLD_SIZE must be a positive integer, got 'abc'"),
    "OMP_NUM_THREADS": ("abc", [], "OMP_NUM_THREADS must be a positive integer, got 'abc'"),
    "LLAMARUN_MODEL": ("/nonexistent/model", ["--model-from-env"], "(from $LLAMARUN_MODEL)"),
    "LLAMARUN_KERNELS": ("maybe", None, "LLAMARUN_KERNELS='maybe' is not valid (use 0 or 1)"),
}
_NAME = r'"([A-Z][A-Z0-9_]{2,})"'
_READS = [  # env.get("X"), os.environ["X"], getenv("X"), typer's envvar="X", X_ENV_VAR = "X"
    re.compile(r"(?:environ|env)(?:\.get\(|\[)\s*" + _NAME),
    re.compile(r"getenv\(\s*" + _NAME),
    re.compile(r"envvar=" + _NAME),
    re.compile(r"^\s*(?:[A-Z_]*ENV[A-Z_]*|_CHILD)\s*=\s*" + _NAME, re.M),
]
_KEY_LOOP = re.compile(r"for key in \(([^)]*)\):")  # for key in ("HF_HUB_CACHE", ...): env.get(key)


def variables_read() -> set[str]:
    """The environment variables llamarun's code reads, found in its source."""
    found: set[str] = set()
    for path in (REPO / "llamarun").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in _READS:
            found.update(pattern.findall(text))
        for names in _KEY_LOOP.findall(text):
            found.update(re.findall(_NAME, names))
    return found


def test_every_variable_read_is_in_the_table() -> None:
    found = variables_read()
    assert {"LLAMARUN_MODEL", "LLAMARUN_COMPILE", "LLAMARUN_TP_TIMEOUT", "HF_HUB_CACHE"} <= found
    unknown = found - ANY_VALUE - set(BAD)
    assert not unknown, f"read but neither validated here nor listed as taking any value: {unknown}"


def run(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items()
            if k not in BAD and k not in ("LLAMARUN_FIXTURES",)}
    full.update({"PYTHONPATH": str(REPO), "LLAMARUN_COMPILE": "0", **env})
    return subprocess.run([sys.executable, "-m", "llamarun", *args], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name", [n for n, (_, args, _) in BAD.items() if args is not None])
def test_a_bad_value_is_one_error_line(name: str) -> None:
    model = str(require_fixture("stories260K", "meta"))
    value, extra, message = BAD[name]
    env = {name: value}
    if name in ("RANK", "LOCAL_RANK"):
        env["WORLD_SIZE"] = "2"
    args = ["complete", "-p", "Hi", "-n", "1"]
    if extra == ["--model-from-env"]:
        extra = []
    else:
        args += ["-m", model]
    r = run(env, [*extra, *args])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0] and name in errors[0], r.stderr[-2000:]


def test_kernels_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamarun import kernels

    value, _, message = BAD["LLAMARUN_KERNELS"]
    monkeypatch.setenv("LLAMARUN_KERNELS", value)
    with pytest.raises(InvalidArgumentError) as e:
        kernels.enabled()
    assert str(e.value) == message
    monkeypatch.setenv("LLAMARUN_KERNELS", "0")
    assert kernels.enabled() is False
