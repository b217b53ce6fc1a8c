"""Incremental decoding through the preallocated cache equals one full forward."""

from __future__ import annotations

import pytest
import torch

from llamarun.config import ModelArgs
from llamarun.model import Span, Transformer

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=200, hidden_dim=128,
                 head_dim=8, rope_theta=10000.0)
SEQ = 24


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ARGS).eval()
    m.setup_caches(max_batch_size=3, max_seq_len=64)
    return m


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def full(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    model.reset_caches()
    return model(tokens, torch.arange(tokens.shape[1]))


@torch.inference_mode()
def test_token_by_token_equals_full_forward_with_batch(model, tokens):
    ref = full(model, tokens)
    model.reset_caches()
    steps = [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(SEQ)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("split", [1, 7, 16, 23])
def test_prefill_then_decode_at_several_positions(model, tokens, split):
    ref = full(model, tokens)
    model.reset_caches()
    first = model(tokens[:, :split], torch.arange(split))
    rest = [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(split, SEQ)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), ref, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_chunked_prefill_and_kv_len_hint(model, tokens):
    ref = full(model, tokens)
    model.reset_caches()
    a = model(tokens[:, :10], torch.arange(10), kv_len=16)
    b = model(tokens[:, 10:20], torch.arange(10, 20), kv_len=32)
    c = model(tokens[:, 20:], torch.arange(20, SEQ), kv_len=SEQ)
    torch.testing.assert_close(torch.cat([a, b, c], 1), ref, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_without_cache_full_forward_is_the_same(tokens):
    torch.manual_seed(0)
    m = Transformer(ARGS).eval()
    m.setup_caches(3, 64)
    cached = full(m, tokens)
    m.setup_caches(3, 64, use_kv_cache=False)
    assert torch.allclose(m(tokens, torch.arange(SEQ)), cached, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_cache_is_allocated_once_and_written_in_place(model, tokens):
    caches = [layer.attention.kv_cache for layer in model.layers]
    ptrs = [(c.k_cache.data_ptr(), c.v_cache.data_ptr()) for c in caches]
    model.reset_caches()
    for i in range(SEQ):
        model(tokens[:, i:i + 1], torch.tensor([i]))
    assert [(c.k_cache.data_ptr(), c.v_cache.data_ptr()) for c in caches] == ptrs
    assert caches[0].k_cache.shape == (3, ARGS.n_kv_heads, 64, ARGS.head_dim)
    # Positions past the written ones stay untouched (zero).
    assert caches[0].k_cache[:, :, SEQ:].abs().sum() == 0
    assert caches[0].k_cache[:, :, :SEQ].abs().sum() > 0


def test_batch_larger_than_cache_is_a_clear_error(model):
    with pytest.raises(ValueError, match="max batch size"):
        model(torch.zeros(4, 1, dtype=torch.long), torch.tensor([0]))


def test_tokens_not_matching_their_spans_are_a_clear_error(model):
    """A pass's packed tokens are exactly its spans' (not a failure inside a kernel)."""
    with pytest.raises(ValueError, match="tokens for spans of 3"):
        model.forward_spans(torch.zeros(4, dtype=torch.long), [Span(0, 0, 2), Span(1, 0, 1)])
    with pytest.raises(ValueError, match="tokens for spans of 2"):
        model.forward_spans(torch.zeros(1, 2, dtype=torch.long), [Span(0, 0, 2)])
