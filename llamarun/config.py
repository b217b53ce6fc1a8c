"""ModelArgs: one immutable model config, built from Meta's params.json or HF's config.json."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamarun import files
from llamarun.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style ("llama3") or linear RoPE frequency scaling."""

    rope_type: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(f"rope scaling type {self.rope_type!r} is not supported")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"rope scaling {name} must be a positive finite number, "
                                  f"got {value!r}")
        if self.rope_type == "llama3" and self.low_freq_factor >= self.high_freq_factor:
            raise ConfigError(f"rope scaling low_freq_factor ({self.low_freq_factor}) must be "
                              f"below high_freq_factor ({self.high_freq_factor})")
        value = self.original_max_position_embeddings
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError("rope scaling original_max_position_embeddings must be a positive "
                              f"integer, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelArgs:
    """Hyperparameters of a Llama model, with Meta's names. Derived sizes are explicit fields."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # FFN width
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 2048  # context length the model was trained for

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                     "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {_short(value)}")
            if value >= 2**63:  # no tensor dimension can be this large
                raise ConfigError(f"{name} is too large to be real, got {_short(value)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")

    @property
    def n_params(self) -> int:
        """Number of parameters (a tied embedding counted once)."""
        attn = self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        attn += self.n_heads * self.head_dim * self.dim
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim

    def replace(self, **changes: Any) -> ModelArgs:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_params(cls, params: dict[str, Any], *, source: str = "params.json",
                    vocab_size: int | None = None) -> ModelArgs:
        """Build from Meta's params.json. `vocab_size` fills in a missing or -1 value.

        Every value is type-checked (a string or a float where an integer belongs, a non-boolean
        flag, a non-finite number are errors naming `source` and the key)."""
        with _naming(source):
            dim = _int(params, "dim", source)
            n_heads = _int(params, "n_heads", source)
            _positive(dim, "dim", source)
            _positive(n_heads, "n_heads", source)
            multiple_of = _int(params, "multiple_of", source, default=256)
            _positive(multiple_of, "multiple_of", source)
            hidden = int(2 * (4 * dim) / 3)
            mult = _float(params, "ffn_dim_multiplier", source, default=None)
            if mult is not None:
                _positive(mult, "ffn_dim_multiplier", source)
                hidden = int(mult * hidden)
            hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
            vocab = _int(params, "vocab_size", source, default=-1)
            if vocab <= 0:
                if vocab_size is None:
                    raise ConfigError(f"{source}: vocab_size is {vocab} and could not be inferred")
                vocab = vocab_size
            scaling = None
            if _bool(params, "use_scaled_rope", source, default=False):
                # Meta's params.json for 3.1 says only use_scaled_rope; its reference then uses
                # factor 8. A folder that records its own factor (3.2 uses 32) is honoured.
                scaling = RopeScaling(
                    rope_type="llama3",
                    factor=_float(params, "rope_scaling_factor", source, default=8.0),
                    low_freq_factor=_float(params, "rope_low_freq_factor", source, default=1.0),
                    high_freq_factor=_float(params, "rope_high_freq_factor", source, default=4.0),
                    original_max_position_embeddings=_int(
                        params, "rope_original_max_seq_len", source, default=8192),
                )
            for key in ("moe_args", "vision_chunk_size", "quantization_args", "lora_args"):
                if params.get(key) not in (None, -1, 0, {}):
                    raise ConfigError(f"{source}: {key} is not supported by llamarun")
            return cls(
                dim=dim,
                n_layers=_int(params, "n_layers", source),
                n_heads=n_heads,
                n_kv_heads=_int(params, "n_kv_heads", source, default=n_heads),
                vocab_size=vocab,
                hidden_dim=hidden,
                head_dim=_int(params, "head_dim", source, default=dim // n_heads),
                norm_eps=_float(params, "norm_eps", source, default=1e-5),
                rope_theta=_float(params, "rope_theta", source, default=10000.0),
                rope_scaling=scaling,
                tie_embeddings=False,
                max_seq_len=_int(params, "max_seq_len", source,
                                 default=2048 if scaling is None else 131072),
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, source: str = "config.json") -> ModelArgs:
        """Build from a Hugging Face LlamaConfig config.json (values type-checked as in
        from_params)."""
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type {_short(model_type)} is not supported "
                              "(only 'llama')")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {_short(act)} is not supported (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if _bool(cfg, key, source, default=False):
                raise ConfigError(f"{source}: {key}=true is not supported")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            log.debug("%s: ignoring pretraining_tp=%s (it only changes the matmul split)",
                      source, _short(cfg.get("pretraining_tp")))
        with _naming(source):
            dim = _int(cfg, "hidden_size", source)
            n_heads = _int(cfg, "num_attention_heads", source)
            _positive(dim, "hidden_size", source)
            _positive(n_heads, "num_attention_heads", source)
            rope_theta, scaling = _hf_rope(cfg, source)
            return cls(
                dim=dim,
                n_layers=_int(cfg, "num_hidden_layers", source),
                n_heads=n_heads,
                n_kv_heads=_int(cfg, "num_key_value_heads", source, default=n_heads),
                vocab_size=_int(cfg, "vocab_size", source),
                hidden_dim=_int(cfg, "intermediate_size", source),
                head_dim=_int(cfg, "head_dim", source, default=dim // n_heads),
                norm_eps=_float(cfg, "rms_norm_eps", source, default=1e-6),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_embeddings=_bool(cfg, "tie_word_embeddings", source, default=False),
                max_seq_len=_int(cfg, "max_position_embeddings", source, default=2048),
            )


_MISSING: Any = object()


@contextmanager
def _naming(source: str) -> Iterator[None]:
    """Prefix a ConfigError raised by the checks in ModelArgs/RopeScaling with the file's name."""
    try:
        yield
    except ConfigError as e:
        message = str(e)
        if message.startswith(f"{source}:"):
            raise
        raise ConfigError(f"{source}: {message}") from None
    except OverflowError:  # sizes beyond what a float can hold, from integers of any length
        raise ConfigError(f"{source}: a size is too large to be real") from None


def _short(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a config value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _int(d: dict[str, Any], key: str, source: str, default: Any = _MISSING) -> Any:
    """d[key] as an int (JSON integers only: not a float, string or boolean); `default` when
    the key is absent or null (required when no default is given)."""
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"{source}: required key {key!r} is missing")
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be an integer, got {_short(value)}")
    return value


def _float(d: dict[str, Any], key: str, source: str, default: Any = _MISSING) -> Any:
    """d[key] as a finite float (an integer is fine; a string, boolean, NaN or infinity is not)."""
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"{source}: required key {key!r} is missing")
        return default
    if not _is_number(value):
        raise ConfigError(f"{source}: {key} must be a number, got {_short(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        value = math.inf
    if not math.isfinite(value):
        raise ConfigError(f"{source}: {key} must be a finite number, got {_short(value)}")
    return value


def _bool(d: dict[str, Any], key: str, source: str, default: bool) -> bool:
    """d[key] as a JSON boolean: "no", 0 or "false" are errors rather than truthy guesses."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {_short(value)}")
    return value


def _positive(value: float, key: str, source: str) -> None:
    if value <= 0:
        raise ConfigError(f"{source}: {key} must be positive, got {value}")


def _hf_rope(cfg: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling/rope_parameters must be objects")
    theta = _float(params, "rope_theta", source, default=None)
    if theta is None:
        theta = _float(cfg, "rope_theta", source, default=10000.0)
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    key = "rope_scaling" if scaling else "rope_parameters"
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        for name in ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"):
            if merged.get(name) is None:
                raise ConfigError(f"{source}: {key} of type llama3 lacks {name!r}")
        return theta, RopeScaling(
            rope_type="llama3",
            factor=_float(merged, "factor", f"{source}: {key}"),
            low_freq_factor=_float(merged, "low_freq_factor", f"{source}: {key}"),
            high_freq_factor=_float(merged, "high_freq_factor", f"{source}: {key}"),
            original_max_position_embeddings=_int(
                merged, "original_max_position_embeddings", f"{source}: {key}"),
        )
    if rope_type == "linear":
        if merged.get("factor") is None:
            raise ConfigError(f"{source}: {key} of type linear lacks 'factor'")
        return theta, RopeScaling(rope_type="linear",
                                  factor=_float(merged, "factor", f"{source}: {key}"))
    raise ConfigError(f"{source}: {key}.rope_type {_short(rope_type)} is not supported "
                      "(supported: default, llama3, linear)")


def read_json(path: Path) -> dict[str, Any]:
    """Read a config's JSON object (params.json, config.json, an index), raising ConfigError
    naming the file on any problem: not a regular file, over 64 MiB, not UTF-8, malformed,
    or nested deeper than any config is (llamarun.files, the one JSON reader)."""
    data = files.read_json(path, what="JSON file", error=ConfigError)
    assert data is not None
    return data
