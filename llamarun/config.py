"""ModelArgs: one immutable model config, built from Meta's params.json or HF's config.json."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")

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
        """Build from Meta's params.json. `vocab_size` fills in a missing or -1 value."""
        try:
            dim = _int(params, "dim", source)
            n_heads = _int(params, "n_heads", source)
            multiple_of = int(params.get("multiple_of", 256))
            hidden = int(2 * (4 * dim) / 3)
            mult = params.get("ffn_dim_multiplier")
            if mult is not None:
                hidden = int(float(mult) * hidden)
            hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
            vocab = int(params.get("vocab_size", -1))
            if vocab <= 0:
                if vocab_size is None:
                    raise ConfigError(f"{source}: vocab_size is {vocab} and could not be inferred")
                vocab = vocab_size
            scaling = None
            if params.get("use_scaled_rope"):
                # Meta's params.json for 3.1 says only use_scaled_rope; its reference then uses
                # factor 8. A folder that records its own factor (3.2 uses 32) is honoured.
                scaling = RopeScaling(
                    rope_type="llama3",
                    factor=float(params.get("rope_scaling_factor", 8.0)),
                    low_freq_factor=float(params.get("rope_low_freq_factor", 1.0)),
                    high_freq_factor=float(params.get("rope_high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        params.get("rope_original_max_seq_len", 8192)),
                )
            for key in ("moe_args", "vision_chunk_size", "quantization_args", "lora_args"):
                if params.get(key) not in (None, -1, 0, {}):
                    raise ConfigError(f"{source}: {key} is not supported by llamarun")
            return cls(
                dim=dim,
                n_layers=_int(params, "n_layers", source),
                n_heads=n_heads,
                n_kv_heads=int(params.get("n_kv_heads") or n_heads),
                vocab_size=vocab,
                hidden_dim=hidden,
                head_dim=int(params.get("head_dim") or dim // n_heads),
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                tie_embeddings=False,
                max_seq_len=int(params.get("max_seq_len", 2048 if scaling is None else 131072)),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: invalid value ({e})") from None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, source: str = "config.json") -> ModelArgs:
        """Build from a Hugging Face LlamaConfig config.json."""
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported (only 'llama')")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ConfigError(f"{source}: {key}=true is not supported")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            log.debug("%s: ignoring pretraining_tp=%s (it only changes the matmul split)",
                      source, cfg.get("pretraining_tp"))
        try:
            dim = _int(cfg, "hidden_size", source)
            n_heads = _int(cfg, "num_attention_heads", source)
            rope_theta, scaling = _hf_rope(cfg, source)
            return cls(
                dim=dim,
                n_layers=_int(cfg, "num_hidden_layers", source),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                vocab_size=_int(cfg, "vocab_size", source),
                hidden_dim=_int(cfg, "intermediate_size", source),
                head_dim=int(cfg.get("head_dim") or dim // n_heads),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: invalid value ({e})") from None


def _int(d: dict[str, Any], key: str, source: str) -> int:
    if key not in d:
        raise ConfigError(f"{source}: required key {key!r} is missing")
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    return value


def _hf_rope(cfg: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling/rope_parameters must be objects")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    key = "rope_scaling" if scaling else "rope_parameters"
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        try:
            return theta, RopeScaling(
                rope_type="llama3",
                factor=float(merged["factor"]),
                low_freq_factor=float(merged["low_freq_factor"]),
                high_freq_factor=float(merged["high_freq_factor"]),
                original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: {key} of type llama3 lacks {e.args[0]!r}") from None
    if rope_type == "linear":
        if "factor" not in merged:
            raise ConfigError(f"{source}: {key} of type linear lacks 'factor'")
        return theta, RopeScaling(rope_type="linear", factor=float(merged["factor"]))
    raise ConfigError(f"{source}: {key}.rope_type {rope_type!r} is not supported "
                      "(supported: default, llama3, linear)")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, raising ConfigError naming the file on any problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
