"""Test helpers: random Llama weights, HF conversion and Meta's model-parallel splitter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamarun.config import ModelArgs
from llamarun.loaders.fuse import expected_shapes


def random_meta_state_dict(args: ModelArgs, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random unfused Meta-named float32 weights for `args` (norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) * (1.0 / shape[1] ** 0.5)
    if args.tie_embeddings:
        del sd["output.weight"]
    return sd


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's rotate-half layout (what HF's converter does)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta-named weights -> transformers LlamaForCausalLM state dict."""
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
           "model.norm.weight": sd["norm.weight"]}
    if "output.weight" in sd:
        out["lm_head.weight"] = sd["output.weight"]
    names = {"attention.wo.weight": "self_attn.o_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight",
             "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"] = permute(sd[p + "attention.wq.weight"], args.n_heads)
        out[q + "self_attn.k_proj.weight"] = permute(sd[p + "attention.wk.weight"], args.n_kv_heads)
        for meta, hf in names.items():
            out[q + hf] = sd[p + meta]
    return out


def hf_config(args: ModelArgs) -> dict:
    """A transformers LlamaConfig dict for `args`."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    if args.rope_scaling is not None:
        s = args.rope_scaling
        cfg["rope_scaling"] = {
            "rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
    return cfg


def transformers_model(args: ModelArgs, sd: dict[str, torch.Tensor]):
    """A float32 transformers LlamaForCausalLM holding the Meta-named weights `sd`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**hf_config(args))).float().eval()
    hf_sd = meta_to_hf(sd, args)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m or "rotary" in m for m in missing), missing
    if args.tie_embeddings:
        model.tie_weights()
    return model


def write_hf_folder(folder: Path, args: ModelArgs, sd: dict[str, torch.Tensor], *,
                    shards: int = 1) -> Path:
    """Write config.json + safetensors (optionally sharded with an index) like HF does."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args)))
    hf_sd = {k: v.contiguous() for k, v in meta_to_hf(sd, args).items()}
    if shards == 1:
        save_file(hf_sd, str(folder / "model.safetensors"))
        return folder
    names = sorted(hf_sd)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: hf_sd[n] for n in names[s::shards]}
        save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# Meta's fairscale layers: which dimension each tensor is split along across model-parallel ranks.
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
           "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def split_meta(sd: dict[str, torch.Tensor], n: int, *, embedding_dim: int,
               rope_freqs: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Split Meta weights into n shards as Meta does.

    ColumnParallelLinear splits outputs (dim 0), RowParallelLinear inputs (dim 1), norms are
    replicated; tok_embeddings is split along `embedding_dim`: 1 for Llama 2's ParallelEmbedding,
    0 for Llama 3's VocabParallelEmbedding. Llama 2 shards also carry rope.freqs.
    """
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in sd.items():
        if name == "tok_embeddings.weight":
            pieces = t.chunk(n, dim=embedding_dim)
        elif name.endswith(_COLUMN):
            pieces = t.chunk(n, dim=0)
        elif name.endswith(_ROW):
            pieces = t.chunk(n, dim=1)
        else:
            pieces = [t] * n
        assert len(pieces) == n, name
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    if rope_freqs is not None:
        for shard in shards:
            shard["rope.freqs"] = rope_freqs.clone()
    return shards


def write_meta_folder(folder: Path, params: dict, shards: list[dict[str, torch.Tensor]]) -> Path:
    """Write params.json + consolidated.NN.pth like Meta's releases."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
