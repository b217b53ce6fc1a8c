"""The decode step CUDA graphs replay (runner.decode_window through graphs.GraphedDecode), on CPU:
the same windows and shapes, run directly instead of recorded (test_cuda records them)."""

from __future__ import annotations

import pytest
import torch

from llamarun.config import ModelArgs
from llamarun.graphs import GraphedDecode
from llamarun.model import Span, Transformer
from llamarun.runner import MIN_WINDOW, decode_window, window_for, windows

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, hidden_dim=96,
                 head_dim=8, rope_theta=10000.0)
MAX_SEQ = 150


def test_windows_double_up_to_the_context():
    assert windows(MAX_SEQ) == [MIN_WINDOW, 2 * MIN_WINDOW, MAX_SEQ]
    assert windows(40) == [40]
    assert window_for(1, MAX_SEQ) == MIN_WINDOW
    assert window_for(MIN_WINDOW, MAX_SEQ) == MIN_WINDOW
    assert window_for(MIN_WINDOW + 1, MAX_SEQ) == 2 * MIN_WINDOW
    assert window_for(MAX_SEQ, MAX_SEQ) == MAX_SEQ


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_windowed_decode_equals_the_exact_lengths_forward(dtype):
    # Rows at different positions decode in one pass; the window grows past 64 on the way.
    # float64: PyTorch's SDPA with a mask; float32 on AVX2 CPUs: llamarun's attention kernel.
    torch.manual_seed(0)
    model = Transformer(ARGS).to(dtype).eval()
    model.setup_caches(max_batch_size=3, max_seq_len=MAX_SEQ)
    ref = Transformer(ARGS).to(dtype).eval()
    ref.load_state_dict(model.state_dict())
    ref.setup_caches(max_batch_size=3, max_seq_len=MAX_SEQ)
    gen = torch.Generator().manual_seed(1)
    prompts = {0: 58, 1: 5, 2: 30}
    steps = 10
    seqs = {r: torch.randint(0, ARGS.vocab_size, (n + steps,), generator=gen)
            for r, n in prompts.items()}
    graphed = GraphedDecode(model, decode_window)
    seen_windows = set()
    with torch.inference_mode():
        expected = {r: ref.forward_spans(s, [Span(r, 0, len(s))]) for r, s in seqs.items()}
        for r, n in prompts.items():
            model.forward_spans(seqs[r][:n], [Span(r, 0, n)])
        for t in range(steps):
            # row 1 twice, as the runner pads a batch to its bucket by repeating a row
            order = [0, 1, 2, 1]
            pos = torch.tensor([prompts[r] + t for r in order])
            tokens = torch.stack([seqs[r][prompts[r] + t] for r in order])
            window = window_for(int(pos.max()) + 1, MAX_SEQ)
            seen_windows.add(window)
            logits = graphed(tokens, torch.tensor(order), pos, window)
            for i, r in enumerate(order):
                torch.testing.assert_close(logits[i], expected[r][prompts[r] + t],
                                           rtol=1e-9 if dtype == torch.float64 else 1e-5,
                                           atol=1e-9 if dtype == torch.float64 else 1e-5)
    assert seen_windows == {MIN_WINDOW, 2 * MIN_WINDOW}
    assert not graphed.graphs  # nothing recorded without CUDA


def test_a_new_cache_drops_the_recordings():
    model = Transformer(ARGS).eval()
    model.setup_caches(max_batch_size=1, max_seq_len=MAX_SEQ)
    graphed = GraphedDecode(model, decode_window)
    graphed._check_cache()
    graphed.graphs[(1, MIN_WINDOW)] = object()  # type: ignore[assignment] (a stand-in)
    graphed._check_cache()
    assert graphed.graphs  # same cache: kept
    model.setup_caches(max_batch_size=1, max_seq_len=2 * MAX_SEQ)
    graphed._check_cache()
    assert not graphed.graphs
