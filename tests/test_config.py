"""ModelArgs from Meta's params.json and HF's config.json, for every Llama generation."""

from __future__ import annotations

import pytest

from llamarun.config import ModelArgs, RopeScaling
from llamarun.errors import ConfigError

# Real params.json values published with Meta's checkpoints, and the FFN width each model has.
META_PARAMS = [
    ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
      "vocab_size": -1}, 11008, "llama1/2 7B"),
    ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
      "vocab_size": -1}, 13824, "llama2 13B"),
    ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
      "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 28672, "llama2 70B"),
    ({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
      "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32016}, 11008, "code llama 7B"),
    ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
      "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05,
      "rope_theta": 500000.0}, 14336, "llama3 8B"),
    ({"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
      "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
      "use_scaled_rope": True, "vocab_size": 128256}, 14336, "llama3.1 8B"),
    ({"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32,
      "n_kv_heads": 8, "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0,
      "use_scaled_rope": True, "vocab_size": 128256}, 8192, "llama3.2 1B"),
]


@pytest.mark.parametrize("params,hidden,name", META_PARAMS, ids=[p[2] for p in META_PARAMS])
def test_meta_ffn_width_follows_multiple_of_rule(params, hidden, name):
    args = ModelArgs.from_params(params, vocab_size=32000)
    assert args.hidden_dim == hidden
    assert args.head_dim == params["dim"] // params["n_heads"]
    assert args.n_kv_heads == params.get("n_kv_heads", params["n_heads"])
    assert args.rope_theta == params.get("rope_theta", 10000.0)
    assert args.vocab_size == (params["vocab_size"] if params["vocab_size"] > 0 else 32000)


def test_meta_scaled_rope_uses_recorded_factor():
    base = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
            "rope_theta": 500000.0, "use_scaled_rope": True}
    assert ModelArgs.from_params(base).rope_scaling.factor == 8.0  # 3.1: Meta's default
    args = ModelArgs.from_params({**base, "rope_scaling_factor": 32.0})
    assert args.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_meta_missing_vocab_size_needs_weights():
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 8, "vocab_size": -1})


LLAMA32_1B_HF = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def test_hf_llama32_config():
    args = ModelArgs.from_hf_config(LLAMA32_1B_HF)
    assert args.tie_embeddings and args.head_dim == 64 and args.hidden_dim == 8192
    assert args.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert args.max_seq_len == 131072 and args.n_kv_heads == 8
    assert 1.2e9 < args.n_params < 1.3e9  # Llama 3.2 1B has 1.24 B parameters


def test_hf_transformers5_rope_parameters():
    cfg = {k: v for k, v in LLAMA32_1B_HF.items() if k not in ("rope_scaling", "rope_theta")}
    cfg["rope_parameters"] = {**LLAMA32_1B_HF["rope_scaling"], "rope_theta": 500000.0}
    args = ModelArgs.from_hf_config(cfg)
    assert args.rope_theta == 500000.0 and args.rope_scaling.factor == 32.0


def test_hf_defaults_for_llama2_config():
    cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_hidden_layers": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "rope_scaling": None}
    args = ModelArgs.from_hf_config(cfg)
    assert args.n_kv_heads == 32 and args.rope_scaling is None and not args.tie_embeddings


@pytest.mark.parametrize("change,key", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_attention_heads": "32"}, "num_attention_heads"),
    ({"num_key_value_heads": 5}, "n_kv_heads"),
])
def test_hf_unsupported_settings_are_errors_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        ModelArgs.from_hf_config({**LLAMA32_1B_HF, **change})


def test_hf_missing_required_key():
    cfg = dict(LLAMA32_1B_HF)
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelArgs.from_hf_config(cfg, source="x/config.json")


def test_unknown_harmless_keys_are_tolerated():
    args = ModelArgs.from_hf_config({**LLAMA32_1B_HF, "some_new_field": {"a": 1}})
    assert args.dim == 2048
