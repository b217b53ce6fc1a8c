"""`llamarun tokenize`: show the token ids (and pieces) a model sees for a text or a chat message."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamarun.cli import app
from llamarun.cli.common import utf8_text
from llamarun.errors import InvalidArgumentError, LlamarunError
from llamarun.tokenizer import ChatFormat, Tokenizer, load_chat_format, load_tokenizer


def _load(model: str | None, tokenizer_file: Path | None) -> tuple[Tokenizer, Path | None]:
    """The tokenizer and the folder that may hold a chat template."""
    if model is not None and tokenizer_file is not None:
        raise InvalidArgumentError("give --model or --tokenizer, not both")
    if tokenizer_file is not None:
        return load_tokenizer(tokenizer_file), tokenizer_file.parent
    from llamarun.resolve import resolve_model

    path = resolve_model(model, env=os.environ, cwd=Path.cwd()).path  # a path or a cached repo id
    return load_tokenizer(path), path if path.is_dir() else None


def _ids(tok: Tokenizer, fmt_folder: Path | None, text: str, *, chat: bool, bos: bool, special: bool) -> list[int]:
    if chat:
        if special:
            raise InvalidArgumentError("--special is for raw text; a --chat message is always text")
        fmt: ChatFormat = load_chat_format(tok, fmt_folder)
        return fmt.encode_dialog([{"role": "user", "content": text}], add_generation_prompt=True)
    if not special:
        return tok.encode(text, bos=bos and tok.add_bos)
    ids = tok.encode_with_special(text)
    if bos and tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        ids.insert(0, tok.bos_id)
    return ids


def token_text(tok: Tokenizer, id: int) -> bytes:
    """The bytes token `id` stands for in a text; a control token's name (`<|eot_id|>`, `<s>`)."""
    if id in tok.control_ids:
        return tok.piece(id).encode()
    return tok.token_bytes(id)


def quoted(data: bytes) -> str:
    """`data` as a JSON-quoted string (newlines, tabs and spaces visible, non-ASCII text as it
    is), with bytes that are not whole UTF-8 characters written \\xNN."""
    parts, rest = [], data
    while rest:
        try:
            parts.append(json.dumps(rest.decode("utf-8"), ensure_ascii=False)[1:-1])
            break
        except UnicodeDecodeError as e:
            parts.append(json.dumps(rest[:e.start].decode("utf-8"), ensure_ascii=False)[1:-1])
            parts.append("".join(f"\\x{b:02x}" for b in rest[e.start:e.end]))
            rest = rest[e.end:]
    return '"' + "".join(parts) + '"'


@app.command("tokenize")
def tokenize(
    text: Annotated[str, typer.Argument(help="Text to tokenize")],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", metavar="PATH|REPO", show_default=False,
        help="Model folder (Meta or HF), GGUF file, or Hugging Face repo id in the local cache "
             "(default: chosen as for every command)")] = None,
    tokenizer_file: Annotated[Optional[Path], typer.Option(
        "--tokenizer", show_default=False,
        help="A tokenizer file: tokenizer.model (SentencePiece or tiktoken) or tokenizer.json "
             "(default: the model's)")] = None,
    no_bos: Annotated[bool, typer.Option("--no-bos", help="Do not add BOS (raw text only)")] = False,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Render TEXT as one user message in the model's chat format")] = False,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"ids": [...], "pieces": [...]}')] = False,
    special: Annotated[bool, typer.Option(
        "--special", "-sp", help="Parse special-token text (<|eot_id|>, </s>, ...) as control tokens; "
        "by default it is plain text")] = False,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Show each token's vocabulary entry as stored (ĠHello, ▁Hello, <0x0A>) "
        "instead of the text it stands for")] = False,
) -> None:
    """Print the token ids of TEXT with the text each stands for, as the model will see them.

    Pieces show as the text they stand for (Ġ and ▁ as spaces, Ċ as a newline); --raw as stored.
    """
    text = utf8_text(text, "TEXT")
    try:
        tok, folder = _load(model, tokenizer_file)
        ids = _ids(tok, folder, text, chat=chat, bos=not no_bos, special=special)
        pieces = [tok.piece(i) for i in ids]
        texts = [token_text(tok, i) for i in ids]
    except LlamarunError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"ids": ids, "pieces": pieces,
                               "text": [t.decode("utf-8", "backslashreplace") for t in texts]},
                              ensure_ascii=False))
        return
    width = max((len(str(i)) for i in ids), default=1)
    for i, piece, text in zip(ids, pieces, texts):
        shown = json.dumps(piece, ensure_ascii=False) if raw else quoted(text)
        typer.echo(f"{i:>{width}}  {shown}")
    typer.echo(f"{len(ids)} tokens ({tok.kind}, vocabulary {tok.vocab_size})", err=True)
