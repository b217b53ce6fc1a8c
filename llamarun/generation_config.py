"""Sampling defaults a checkpoint ships in Hugging Face's generation_config.json.

Only the sampling keys are read (temperature, top_p, top_k, min_p, repetition_penalty), under
SamplingParams' names. `do_sample: false` means greedy in transformers, so it becomes
temperature 0. GGUF files and Meta folders without an HF sibling have no defaults.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llamarun.config import read_json
from llamarun.errors import LlamarunError
from llamarun.sampling import SamplingParams

log = logging.getLogger(__name__)

FILE_NAME = "generation_config.json"
# generation_config.json key -> SamplingParams field
_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
         "repetition_penalty": "repeat_penalty"}


def generation_config_file(path: Path) -> Path | None:
    """The generation_config.json that belongs to checkpoint `path`, if any.

    An HF folder has it inside; a Meta `original/` folder of an HF repository has it beside.
    """
    if not path.is_dir():
        return None
    for folder in (path, path.parent):
        candidate = folder / FILE_NAME
        if candidate.is_file():
            return candidate
        if path.name != "original":
            break
    return None


def generation_defaults(path: str | Path) -> dict[str, float | int]:
    """The sampling defaults the checkpoint at `path` asks for (SamplingParams field -> value).

    Values SamplingParams would refuse are dropped with a warning, so a bad file never stops a
    run; an unreadable file gives no defaults (and a warning).
    """
    file = generation_config_file(Path(path))
    if file is None:
        return {}
    try:
        cfg = read_json(file)
    except LlamarunError as e:
        log.warning("ignoring %s", e)
        return {}
    out: dict[str, float | int] = {}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    for key, name in _KEYS.items():
        value = cfg.get(key)
        if value is None or (name == "temperature" and "temperature" in out):
            continue
        if name == "top_k" and isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            SamplingParams(**{name: value})
        except (LlamarunError, TypeError):
            log.warning("%s: ignoring %s=%r (not a valid %s)", file, key, value, name)
            continue
        out[name] = value
    return out
