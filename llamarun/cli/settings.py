"""Sampling settings and model flags: checked up front, with one message style for flags and `/set`.

Every message reads `NAME must be RANGE, got VALUE`, where NAME is the flag as typed
(`--top-p`) or the `/set` name (`top_p`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llamarun.errors import InvalidArgumentError
from llamarun.sampling import SamplingParams

DEFAULT_SAMPLING = SamplingParams()


@dataclass(frozen=True)
class Setting:
    """One setting: its type, the accepted range in words, and the check."""

    kind: type  # int or float
    accepted: str  # "at least 1", "in (0, 1] (1 = off)"
    ok: Callable[[float], bool]
    none_allowed: bool = False  # `/set seed none`


SETTINGS: dict[str, Setting] = {
    "temperature": Setting(float, "at least 0 (0 = greedy)", lambda v: v >= 0),
    "top_k": Setting(int, "at least 0 (0 = off)", lambda v: v >= 0),
    "top_p": Setting(float, "in (0, 1] (1 = off)", lambda v: 0 < v <= 1),
    "min_p": Setting(float, "in [0, 1] (0 = off)", lambda v: 0 <= v <= 1),
    "repeat_penalty": Setting(float, "above 0 (1 = off)", lambda v: v > 0),
    "seed": Setting(int, "in [0, 2**63)", lambda v: 0 <= v < 2**63, none_allowed=True),
    "max_tokens": Setting(int, "at least 1", lambda v: v >= 1),
}
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")


def flag(name: str) -> str:
    """The flag of a setting: top_p -> --top-p."""
    return "--" + name.replace("_", "-")


def _type_word(s: Setting) -> str:
    return "an integer" if s.kind is int else "a number"


def check(name: str, value: object, *, shown: str) -> None:
    """Raise InvalidArgumentError naming `shown` when `value` is outside the setting's range."""
    s = SETTINGS[name]
    if value is None and s.none_allowed:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (s.kind is int and not isinstance(value, int)):
        raise InvalidArgumentError(f"{shown} must be {_type_word(s)} {s.accepted}, got {value!r}")
    assert isinstance(value, (int, float))
    if not math.isfinite(value) or not s.ok(value):
        raise InvalidArgumentError(f"{shown} must be {s.accepted}, got {value}")


def parse(name: str, text: str) -> int | float | None:
    """`/set NAME VALUE`: the parsed value, or InvalidArgumentError naming NAME."""
    s = SETTINGS[name]
    text = text.strip()
    if s.none_allowed and text.lower() == "none":
        return None
    try:
        value: int | float = s.kind(text)
    except ValueError:
        none = " or none" if s.none_allowed else ""
        raise InvalidArgumentError(
            f"{name} must be {_type_word(s)} {s.accepted}{none}, got {text!r}") from None
    if not math.isfinite(value) or not s.ok(value):
        raise InvalidArgumentError(f"{name} must be {s.accepted}, got {text}")
    return value


def check_flags(values: Mapping[str, object]) -> None:
    """Check the sampling flags that were given (None: not given)."""
    for name, value in values.items():
        if value is not None:
            check(name, value, shown=flag(name))


def sampling_params(explicit: Mapping[str, object], *,
                    defaults: Mapping[str, object] | None = None,
                    base: SamplingParams | None = None) -> SamplingParams:
    """SamplingParams from `base` (default: llamarun's), then `defaults`, then the given flags."""
    values = {k: v for k, v in (defaults or {}).items() if k in SAMPLING_FIELDS}
    values.update({k: v for k, v in explicit.items() if k in SAMPLING_FIELDS and v is not None})
    return dataclasses.replace(base or DEFAULT_SAMPLING, **values)


# --- model flags ---------------------------------------------------------------------------

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = "auto, float32, bfloat16 or float16"


def check_device(spec: str) -> None:
    """--device: the syntax, then whether this machine has it."""
    from llamarun.device import resolve_device

    if not _DEVICE.fullmatch(spec.strip().lower()):
        raise InvalidArgumentError(f"--device must be {DEVICES}, got {spec!r}")
    try:
        resolve_device(spec)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"--device must be a device this machine has, got {spec!r} "
                                   f"({e})") from None


def check_dtype(spec: str) -> None:
    """--dtype: auto or a float type (aliases such as bf16 accepted)."""
    import torch

    from llamarun.device import resolve_dtype

    try:
        resolve_dtype(spec, torch.device("cpu"))
    except InvalidArgumentError:
        raise InvalidArgumentError(f"--dtype must be {DTYPES}, got {spec!r}") from None


def check_min(flag_name: str, value: int | None, minimum: int) -> None:
    """An integer flag with a lower bound (None: not given)."""
    if value is not None and value < minimum:
        raise InvalidArgumentError(f"{flag_name} must be at least {minimum}, got {value}")
