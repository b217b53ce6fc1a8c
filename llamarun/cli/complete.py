"""`llamarun complete`: continue a raw text prompt, streamed to stdout."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from llamarun.cli import app, console
from llamarun.cli.common import load_engine, model_sampling, read_stdin, utf8_text
from llamarun.cli.distributed import rank0
from llamarun.cli.grammar import GrammarFlag, JsonObjectFlag, JsonSchemaFlag, bind, read_grammar
from llamarun.cli.options import ModelOptions, SamplingFlags, SpecOptions, model_command
from llamarun.engine import GenerationResult
from llamarun.errors import InvalidArgumentError

DEFAULT_MAX_TOKENS = 256


def read_prompt(prompt: str | None) -> str:
    """The --prompt text, or stdin for `-` or when stdin is piped (one final newline dropped)."""
    if prompt is not None and prompt != "-":
        return utf8_text(prompt, "--prompt")
    if prompt is None and sys.stdin.isatty():
        raise InvalidArgumentError("no prompt: give --prompt TEXT, --prompt - or pipe text on stdin")
    text = read_stdin()
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def timing_line(r: GenerationResult) -> str:
    """`prompt: N tok, X tok/s | generation: M tok, Y tok/s`."""
    return (f"prompt: {r.prompt_tokens} tok, {r.prefill_tok_s:.1f} tok/s | "
            f"generation: {r.completion_tokens} tok, {r.decode_tok_s:.1f} tok/s")


def result_json(r: GenerationResult, *, model: str, load_s: float) -> dict[str, object]:
    """The --json object: text, finish reason, token counts and timings."""
    return {
        "text": r.text,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "token_ids": list(r.token_ids),
        "model": model,
        "timings": {
            "load_s": load_s,
            "prefill_s": r.prefill_s,
            "prefill_tok_s": r.prefill_tok_s,
            "time_to_first_token_s": r.prefill_s,
            "decode_s": r.decode_s,
            "decode_tok_s": r.decode_tok_s,
        },
    }


@app.command()
@model_command(sampling=True, speculative=True, max_tokens=DEFAULT_MAX_TOKENS)
def complete(
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", metavar="TEXT", show_default=False,
        help="Text to continue; `-` reads stdin (default: stdin when it is piped)")] = None,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the completion")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (text, finish reason, counts, timings) at the end")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No timing line on stderr")] = False,
    special: Annotated[bool, typer.Option(
        "--special", "-sp", help="Parse special-token text in the prompt (<|eot_id|>, </s>, ...) as "
        "control tokens; by default it is plain text")] = False,
    json_object: JsonObjectFlag = False,
    json_schema: JsonSchemaFlag = None,
    grammar: GrammarFlag = None,
    *,
    opts: ModelOptions,
    spec: SpecOptions,
    flags: SamplingFlags,
) -> None:
    """Continue a raw text prompt (no chat template) and stream the continuation to stdout.

    Sampling defaults: the model's generation_config.json where it has one, else llamarun's.
    """
    stdin_prompt = "the prompt" if prompt in (None, "-") else None
    wanted = rank0(lambda: read_grammar(json_object, json_schema, grammar, stdin_taken=stdin_prompt))
    text = rank0(lambda: read_prompt(prompt))  # a tensor-parallel job: rank 0 reads
    engine = load_engine(opts, spec=spec)
    constraint = bind(wanted, engine.tokenizer)
    params, _ = model_sampling(engine, flags.given())
    n = flags.max_tokens if flags.max_tokens is not None else DEFAULT_MAX_TOKENS
    gen = engine.complete(text, sampling=params, max_new_tokens=n, stop=list(flags.stop),
                          echo=echo and not json_out, special=special, constraint=constraint)
    try:
        for chunk in gen:
            if chunk.text and not json_out:
                console.write(chunk.text)
    finally:
        gen.close()
    result = gen.result
    if json_out:
        obj = result_json(result, model=str(engine.checkpoint.path), load_s=engine.load_s)
        if echo:
            obj["prompt"] = text
        console.write(json.dumps(obj, ensure_ascii=False) + "\n")
    else:
        console.write("\n")
    if not quiet and not json_out:
        console.note(timing_line(result))
