"""Our model against transformers' LlamaForCausalLM on the same random weights."""

from __future__ import annotations

import pytest
import torch

from llamarun import kernels
from llamarun.config import ModelArgs, RopeScaling
from llamarun.loaders import load_checkpoint
from model_util import random_meta_state_dict, rel_err, transformers_model, write_hf_folder

BASE = dict(dim=64, n_layers=2, vocab_size=300, hidden_dim=160, norm_eps=1e-5, max_seq_len=256)
CONFIGS = {
    "mha": ModelArgs(n_heads=4, n_kv_heads=4, head_dim=16, **BASE),
    "gqa": ModelArgs(n_heads=8, n_kv_heads=2, head_dim=8, rope_theta=500000.0, **BASE),
    "tied": ModelArgs(n_heads=4, n_kv_heads=2, head_dim=16, tie_embeddings=True, **BASE),
    "llama3.1-rope": ModelArgs(
        n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
        **BASE),
    "llama3.2-rope32-tied": ModelArgs(
        n_heads=4, n_kv_heads=1, head_dim=16, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=32),
        **BASE),
    "explicit-head-dim": ModelArgs(n_heads=4, n_kv_heads=2, head_dim=32, **BASE),
}
SEQ = 40  # longer than original_max_position_embeddings above, so the scaled band matters


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    args = CONFIGS[request.param]
    sd = random_meta_state_dict(args, seed=hash(request.param) % 1000)
    folder = write_hf_folder(tmp_path_factory.mktemp(request.param), args, sd)
    ours = load_checkpoint(folder, device="cpu", dtype="float32", max_seq_len=64,
                           max_batch_size=2)
    assert ours.args == args.replace(max_seq_len=args.max_seq_len)
    return ours.model, transformers_model(args, sd), args


def tokens(args: ModelArgs, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, args.vocab_size, (batch, SEQ), generator=g)


@torch.inference_mode()
def test_full_sequence_logits_match(pair):
    model, ref, args = pair
    t = tokens(args)
    model.reset_caches()
    ours = model(t, torch.arange(SEQ))
    theirs = ref(t).logits
    assert rel_err(ours, theirs) <= 1e-4


@torch.inference_mode()
def test_token_by_token_logits_match(pair):
    model, ref, args = pair
    t = tokens(args)
    theirs = ref(t).logits
    model.reset_caches()
    steps = [model(t[:, i:i + 1], torch.tensor([i])) for i in range(SEQ)]
    assert rel_err(torch.cat(steps, dim=1), theirs) <= 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_token_by_token_logits_match_by_either_attention(pair, attention, monkeypatch):
    """Decode-sized spans attend through kernels.attend where it serves (float32 CPU), else
    one SDPA call each: both match transformers."""
    model, ref, args = pair
    if attention == "sdpa":
        monkeypatch.setattr(kernels, "serves_attention", lambda q, k: False)
    elif not kernels.serves_attention(torch.zeros(1, 1, args.head_dim),
                                      torch.zeros(1, 1, 1, args.head_dim)):
        pytest.skip("no attention kernel on this machine")
    t = tokens(args, batch=1)
    theirs = ref(t).logits
    model.reset_caches()
    steps = [model(t[:, :5], torch.arange(5))]  # a span of several tokens, then one at a time
    steps += [model(t[:, i:i + 1], torch.tensor([i])) for i in range(5, SEQ)]
    assert rel_err(torch.cat(steps, dim=1), theirs) <= 1e-4


@torch.inference_mode()
def test_logits_only_where_needed(pair):
    model, ref, args = pair
    t = tokens(args, batch=1)
    model.reset_caches()
    last = model(t, torch.arange(SEQ), output_idx=torch.tensor([SEQ - 1]))
    assert last.shape == (1, 1, args.vocab_size)
    assert rel_err(last[0, 0], ref(t).logits[0, -1]) <= 1e-4
