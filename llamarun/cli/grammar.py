"""The structured-output flags of `complete` and `chat`: --json-object, --json-schema, --grammar.

They are read and checked before a model is loaded (a bad schema is the only line printed),
then bound to the model's tokenizer (llamarun.structured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llamarun import files, structured
from llamarun.cli.common import read_stdin
from llamarun.errors import InvalidArgumentError
from llamarun.sampling import Constraint
from llamarun.tokenizer import Tokenizer

PANEL = "Structured output"

JsonObjectFlag = Annotated[bool, typer.Option(
    "--json-object", rich_help_panel=PANEL,
    help="The output is one JSON object (any keys and values)")]
JsonSchemaFlag = Annotated[Optional[str], typer.Option(
    "--json-schema", metavar="FILE|-", show_default=False, rich_help_panel=PANEL,
    help="The output is JSON valid against this JSON schema (a file, or `-` for stdin; "
         "default: free output)")]
GrammarFlag = Annotated[Optional[str], typer.Option(
    "--grammar", metavar="FILE|-", show_default=False, rich_help_panel=PANEL,
    help="The output matches this grammar: GBNF as llama.cpp's (`root ::= ...`) or Lark "
         "(`start: ...`; default: free output)")]


def read_grammar(json_object: bool, json_schema: str | None, grammar: str | None, *,
                 stdin_taken: str | None = None) -> structured.Grammar | None:
    """The grammar the flags ask for (None without them), checked; `stdin_taken` names what
    else reads stdin, if anything (then `-` is refused)."""
    given = [name for name, value in (("--json-object", json_object), ("--json-schema", json_schema),
                                      ("--grammar", grammar)) if value]
    if len(given) > 1:
        raise InvalidArgumentError(f"give one of {' / '.join(given)}, not several")
    if json_object:
        return structured.json_object()
    if json_schema is not None:
        return structured.json_schema(_read(json_schema, "--json-schema", stdin_taken),
                                      what=f"--json-schema {json_schema}")
    if grammar is not None:
        return structured.grammar(_read(grammar, "--grammar", stdin_taken),
                                  what=f"--grammar {grammar}")
    return None


def bind(grammar: structured.Grammar | None, tokenizer: Tokenizer) -> Constraint | None:
    """The grammar as a constraint on the model's tokens (None for None)."""
    if grammar is None:
        return None
    return structured.GrammarCompiler(tokenizer).constraint(grammar)


def _read(arg: str, flag: str, stdin_taken: str | None) -> str:
    if arg == "-":
        if stdin_taken:
            raise InvalidArgumentError(f"{flag} - cannot read stdin: {stdin_taken} reads it; "
                                       f"give {flag} a file")
        return read_stdin(f"{flag} -")
    return files.read_text(Path(arg), what=f"{flag} file", error=InvalidArgumentError,
                           limit=structured.MAX_SPEC_BYTES)
