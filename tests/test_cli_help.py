"""Every command's --help reads like a well-made CLI's: no Python type noise after flags."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from llamarun.cli import app

NOISE = re.compile(r"<(bool|str|int|float|path|list\[[^\]]*\])>|\{[a-z_]+\}")


def commands() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


def test_every_command_is_checked() -> None:
    assert {"bench", "chat", "complete", "info", "list", "perplexity", "tokenize"} <= set(commands())


@pytest.mark.parametrize("args", [[]] + [[name] for name in commands()])
def test_help_has_no_type_noise(args: list[str]) -> None:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    assert "--help" in r.stdout
    assert not NOISE.search(r.stdout), NOISE.search(r.stdout)


def test_flags_take_no_metavar_and_values_have_one() -> None:
    r = CliRunner().invoke(app, ["complete", "--help"], env={"COLUMNS": "200"})
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line[2:4] == "--"}
    assert re.search(r"--echo\s+Print", lines["--echo"])
    assert re.search(r"--max-tokens\s+-n\s+N\s", lines["--max-tokens"])
    assert re.search(r"--stop\s+TEXT\s", lines["--stop"])
    assert re.search(r"--model\s+-m\s+PATH\|REPO\s", lines["--model"])


def test_required_argument_shown_by_name() -> None:
    r = CliRunner().invoke(app, ["tokenize", "--help"])
    assert "Usage: llamarun tokenize [OPTIONS] TEXT" in r.stdout
