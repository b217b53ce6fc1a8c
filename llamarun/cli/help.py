"""Help text that reads like a well-made CLI's: no `<bool>` after flags, TEXT/N/PATH metavars.

Recent Typer versions print each option's Python type (`--echo <bool>`, `--stop <list[str]>`)
and write a required argument as `{text}`. `Group` (the app's group class) tidies the
parameters of every command it hands out, so commands added later need nothing of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from typer.core import TyperArgument, TyperGroup, TyperOption

if TYPE_CHECKING:  # Typer >= 0.22 vendors Click as typer._click; older ones use click itself
    import click

# Typer's type label -> the metavar shown instead; anything else is upper-cased.
_METAVARS = {"int": "N", "float": "NUMBER", "str": "TEXT", "path": "PATH", "list[str]": "TEXT",
             "list[int]": "N", "list[path]": "PATH", "bool": ""}


class _Argument(TyperArgument):
    """A positional argument shown by its metavar alone: `TEXT`, `[FILE|-]`."""

    def display_type_rich(self, ctx: click.Context) -> str | None:  # type: ignore[override]
        return None

    def get_usage_pieces(self, ctx: click.Context) -> list[str]:  # type: ignore[override]
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return [name if self.required else f"[{name}]"]


def metavar_for(label: str) -> str:
    """The metavar for one of Typer's type labels (`<int>` -> `N`)."""
    label = label.strip("<>")
    return _METAVARS.get(label, label.upper())


def tidy(params: Sequence[click.Parameter], ctx: click.Context) -> None:
    """Give flags no metavar and value options a plain one; show arguments by name."""
    for p in params:
        if isinstance(p, TyperOption) and p.metavar is None:
            if p.is_flag or p.count:
                p.metavar = ""
            else:
                p.metavar = metavar_for(p.display_type(ctx))
        elif isinstance(p, TyperArgument) and not isinstance(p, _Argument):
            if p.metavar is None:
                p.metavar = (p.name or "arg").upper()
            # Swap the class (no new state) rather than re-declaring every argument.
            p.__class__ = _Argument


class Group(TyperGroup):
    """The `llamarun` group: tidies its own options and those of each command it resolves."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:  # type: ignore[override]
        params = super().get_params(ctx)
        tidy(params, ctx)
        return params

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # type: ignore[override]
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            tidy(cmd.get_params(ctx), ctx)
        return cmd


def unknown_option_message(e: Exception) -> str | None:
    """`no such option: --modle (did you mean --model?)` for an option the command lacks: the
    nearest real option of that command (a different case, a prefix, a typo), else the commands
    that have it; None for other usage errors."""
    name = getattr(e, "option_name", None)
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ != "NoSuchOption" or not isinstance(name, str) or ctx is None:
        return None
    known = _option_names(ctx.command, ctx)
    root = ctx.find_root()
    if ctx is not root:
        known += [o for o in _option_names(root.command, root) if o not in known]
    where = f" for {ctx.info_name}" if ctx is not root else ""
    message = f"no such option{where}: {name}"
    near = near_options(name, known)
    if near:
        return f"{message} (did you mean {' or '.join(near)}?)"
    group = root.command
    owners = [cmd for cmd, command in sorted(getattr(group, "commands", {}).items())
              if command is not ctx.command and name in _option_names(command, root)]
    if owners:
        after = "; put it after the command" if ctx is root else ""
        return f"{message} (an option of {', '.join(owners)}{after})"
    return message


def _option_names(command: click.Command, ctx: click.Context) -> list[str]:
    return [o for p in command.get_params(ctx) for o in (*p.opts, *p.secondary_opts)
            if o.startswith("-")]


def near_options(name: str, known: Sequence[str]) -> list[str]:
    """The real options `name` most likely meant: the same in another case, those it is the
    start of (`--temp`), else the closest spelling (`--modle`), else none."""
    import difflib

    lower = name.lower()
    same = [o for o in known if o.lower() == lower]
    if same:
        return same[:1]
    if lower.startswith("--") and len(lower) > 3:
        starts = [o for o in known if o.lower().startswith(lower)]
        if starts:
            return starts[:3]
    longs = [o for o in known if o.startswith("--")] if lower.startswith("--") else list(known)
    return difflib.get_close_matches(lower, longs, n=1, cutoff=0.75)
