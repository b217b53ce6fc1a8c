"""`llamarun info`: what the resolved checkpoint is and how it will run."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

import torch

from llamarun import kernels
from llamarun.cli import app, console, settings
from llamarun.cli.common import load_engine
from llamarun.cli.options import ModelOptions, model_command
from llamarun.device import device_name
from llamarun.engine import Engine
from llamarun.generation_config import generation_defaults

SHOWN_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


def describe(engine: Engine, *, dtype_spec: str = "auto") -> dict[str, object]:
    """Checkpoint, layout, config, size, dtype (and why), tokenizer and chat format as plain data.

    dtype_spec: what --dtype asked for.
    """
    tok = engine.tokenizer
    stops = sorted(tok.stop_ids)
    from_model = generation_defaults(engine.checkpoint.path)
    params = settings.sampling_params({}, defaults=from_model)
    return {
        "checkpoint": str(engine.checkpoint.path),
        "layout": engine.checkpoint.layout,
        "parameters": engine.args.n_params,
        "device": str(engine.device),
        "device_name": device_name(engine.device),
        "threads": torch.get_num_threads(),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "dtype_reason": _dtype_reason(engine, dtype_spec),
        "weights": engine.checkpoint.format_counts(),
        "kernels": kernels.summary(engine.device),
        "stored_as": _stored_as(engine),
        "kv_cache_tokens": engine.max_seq_len,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "add_bos": tok.add_bos,
        "stop_tokens": {str(i): tok.piece(i) for i in stops},
        "chat_format": engine.chat_format.name,
        "sampling_defaults": {k: getattr(params, k) for k in SHOWN_SAMPLING},
        "sampling_defaults_from_model": sorted(from_model),  # from generation_config.json
        "config": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                   for k, v in vars(engine.args).items()},
    }


def _dtype_reason(engine: Engine, spec: str) -> str:
    """Why the model computes in engine.dtype: the flag, or what `auto` went by."""
    if spec.strip().lower() != "auto":
        return f"--dtype {spec}"
    from llamarun.device import auto_dtype
    from llamarun.loaders import _stored_dtype

    ckpt = engine.checkpoint
    return "auto: " + auto_dtype(engine.device, _stored_dtype(ckpt.raw, ckpt.formats))[1]


def _stored_as(engine: Engine) -> dict[str, str]:
    """Each matrix: how the file stored it -> what it became (e.g. "Q4_1 -> int4 (group 32)")."""
    from llamarun.loaders.fuse import linear_sources

    ckpt = engine.checkpoint
    out = {}
    for name, sources in linear_sources(ckpt.args).items():
        stored = "+".join(sorted({ckpt.raw.stored_type(s) for s in sources}))
        out[name] = f"{stored} -> {ckpt.storage(name)}"
    return out


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return str(n)


@app.command()
@model_command(compile=False)
def info(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    *,
    opts: ModelOptions,
) -> None:
    """Show the resolved checkpoint, its config, tokenizer, chat format and stop tokens."""
    engine = load_engine(opts)
    data = describe(engine, dtype_spec=opts.dtype)
    if json_out:
        console.write(json.dumps(data, ensure_ascii=False) + "\n")
        return
    config = data.pop("config")
    stops = data.pop("stop_tokens")
    data.pop("stored_as")  # per tensor: --json only
    data["dtype"] = f"{data['dtype']} ({data.pop('dtype_reason')})"
    threads = data.pop("threads")  # the CPU's threads: what a CPU device computes with
    data["device"] = f"{data['device']} ({data.pop('device_name')}" + (
        f", {threads} threads)" if engine.device.type == "cpu" else ")")
    weights = data.pop("weights")
    sampling = data.pop("sampling_defaults")
    from_model = data.pop("sampling_defaults_from_model")
    assert isinstance(weights, dict) and isinstance(sampling, dict)
    assert isinstance(config, dict) and isinstance(stops, dict) and isinstance(from_model, list)
    data["weights"] = ", ".join(f"{n} {fmt}" for fmt, n in weights.items())
    data["parameters"] = _human(engine.args.n_params)
    data["stop_tokens"] = ", ".join(f"{i} {p!r}" for i, p in stops.items()) or "none"
    data["sampling_defaults"] = ", ".join(
        f"{k} {v}" + (" (generation_config.json)" if k in from_model else "")
        for k, v in sampling.items())
    rows = [(key.replace("_", " "), str(value)) for key, value in data.items()]
    rows += [(f"config.{key}", str(value)) for key, value in config.items()]
    console.print_rows(rows)
