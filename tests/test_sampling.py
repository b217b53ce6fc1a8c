"""Sampling functions against hand-computed distributions."""

from __future__ import annotations

import math

import pytest
import torch

from llamarun.errors import InvalidArgumentError
from llamarun.sampling import (
    SamplingParams,
    apply_repeat_penalty,
    greedy,
    logits_to_probs,
    make_generator,
    multinomial,
    sample,
)

P = [0.5, 0.25, 0.15, 0.1]
LOGITS = torch.tensor(P).log()


def close(t: torch.Tensor, expected: list[float]) -> None:
    assert torch.allclose(t, torch.tensor(expected), atol=1e-6), t.tolist()


def test_temperature_one_is_softmax() -> None:
    close(logits_to_probs(LOGITS, temperature=1.0), P)


def test_temperature_two_takes_square_roots() -> None:
    roots = [math.sqrt(p) for p in P]
    close(logits_to_probs(LOGITS, temperature=2.0), [r / sum(roots) for r in roots])


def test_low_temperature_sharpens() -> None:
    probs = logits_to_probs(LOGITS, temperature=0.5)  # p^2 normalised
    squares = [p * p for p in P]
    close(probs, [s / sum(squares) for s in squares])


def test_top_k() -> None:
    close(logits_to_probs(LOGITS, temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0])
    close(logits_to_probs(LOGITS, temperature=1.0, top_k=1), [1.0, 0.0, 0.0, 0.0])
    close(logits_to_probs(LOGITS, temperature=1.0, top_k=10), P)  # k >= vocab: no-op


@pytest.mark.parametrize("top_p, kept", [(0.3, 1), (0.5, 1), (0.7, 2), (0.75, 2), (0.76, 3),
                                         (0.95, 4), (1.0, 4)])
def test_top_p_keeps_smallest_set_reaching_mass(top_p: float, kept: int) -> None:
    mass = sum(P[:kept])
    expected = [p / mass if i < kept else 0.0 for i, p in enumerate(P)]
    close(logits_to_probs(LOGITS, temperature=1.0, top_p=top_p), expected)


def test_top_p_with_unsorted_logits() -> None:
    perm = [2, 0, 3, 1]
    probs = logits_to_probs(LOGITS[perm], temperature=1.0, top_p=0.7)
    close(probs, [0, 2 / 3, 0, 1 / 3])


def test_min_p() -> None:
    # threshold = 0.4 * 0.5 = 0.2: keeps 0.5 and 0.25
    close(logits_to_probs(LOGITS, temperature=1.0, min_p=0.4), [2 / 3, 1 / 3, 0, 0])
    # threshold = 0.19 * 0.5 = 0.095: keeps everything
    close(logits_to_probs(LOGITS, temperature=1.0, min_p=0.19), P)
    close(logits_to_probs(LOGITS, temperature=1.0, min_p=1.0), [1.0, 0.0, 0.0, 0.0])


def test_filters_compose_in_order() -> None:
    # top_k=3 -> [.5,.25,.15]/.9; top_p=0.8: masses before .0,.556,.833 -> keep 2 -> [2/3,1/3]
    close(logits_to_probs(LOGITS, temperature=1.0, top_k=3, top_p=0.8), [2 / 3, 1 / 3, 0, 0])


def test_batched_rows_are_independent() -> None:
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    probs = logits_to_probs(logits, temperature=1.0, top_k=2)
    close(probs[0], [2 / 3, 1 / 3, 0, 0])
    close(probs[1], [0, 0, 1 / 3, 2 / 3])


def test_repeat_penalty() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repeat_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    close(out, [1.0, -2.0, 0.5, 3.0])
    close(logits, [2.0, -1.0, 0.5, 3.0])  # pure: input untouched
    assert apply_repeat_penalty(logits, torch.tensor([0]), 1.0) is logits


def test_repeat_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.0, 0.0])
    assert sample(logits, SamplingParams.greedy()).item() == 0
    params = SamplingParams(temperature=0.0, repeat_penalty=2.0)
    assert sample(logits, params, recent=torch.tensor([0])).item() == 1


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    logits = torch.tensor([[0.1, 5.0, 0.2], [3.0, 1.0, 2.0]])
    assert sample(logits, SamplingParams.greedy()).tolist() == [1, 0]
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_matches_argmax_ties_and_nan_included(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 49152, generator=g).to(dtype)
    logits[1, [7, 40000, 123]] = 50.0  # a tie: the first index wins, as argmax's
    logits[2] = 0.0  # all tied
    logits[3, [9000, 10]] = float("nan")  # NaN counts as the largest, as in argmax
    logits[4, -1] = float("inf")
    logits[5, :] = float("-inf")
    want = torch.argmax(logits, dim=-1)
    assert greedy(logits).tolist() == want.tolist() == [want[0].item(), 7, 0, 10, 49151, 0]
    assert [greedy(row).item() for row in logits] == want.tolist()


def test_multinomial_frequencies_match_probabilities() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(40000, 4)
    draws = multinomial(probs, make_generator(torch.device("cpu"), 0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015), freq.tolist()


def test_sample_follows_filtered_distribution() -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0)
    draws = sample(LOGITS.expand(30000, 4), params, make_generator(torch.device("cpu"), 1))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.015), freq.tolist()


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                     min_p: float, edge: list[int] | None = None) -> torch.Tensor:
    """The filters over the whole vocabulary in float64, one row, by a full sort. `edge` gets
    the tokens whose fate float32 rounding may decide (mass before within 1e-5 of top_p)."""
    z = logits.double() / temperature
    order = torch.argsort(z, descending=True, stable=True)
    p = torch.softmax(z[order], dim=0)
    if 0 < top_k < len(p):
        p[top_k:] = 0
        p /= p.sum()
    if top_p < 1.0:
        before = p.cumsum(0) - p
        if edge is not None:
            edge += order[(before - top_p).abs() < 1e-5].tolist()
        p[before >= top_p] = 0
        p /= p.sum()
    if min_p > 0:
        p[p < min_p * p.max()] = 0
        p /= p.sum()
    return torch.zeros_like(p).scatter_(0, order, p)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat (a full sort), middling, peaked
@pytest.mark.parametrize("top_k, top_p, min_p", [(40, 0.95, 0.05), (0, 0.9, 0.0), (0, 0.5, 0.0),
                                                 (0, 0.999, 0.0), (300, 1.0, 0.0),
                                                 (0, 1.0, 0.02), (7, 0.6, 0.1)])
def test_filters_on_a_large_vocabulary_match_a_full_sort(scale: float, top_k: int, top_p: float,
                                                         min_p: float) -> None:
    # 20,000 tokens: top-k and top-p run on a few candidates (256 or 4,096 of them for top-p
    # alone, where those hold the mass), and must keep what a sort of the whole vocabulary keeps
    logits = torch.randn(3, 20000, generator=torch.Generator().manual_seed(5)) * scale
    probs = logits_to_probs(logits, temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    for row in range(3):
        edge: list[int] = []
        expected = _reference_probs(logits[row], 0.8, top_k, top_p, min_p, edge)
        differ = ((probs[row] > 0) != (expected > 0)).nonzero().flatten().tolist()
        assert set(differ) <= set(edge)
        if not differ:
            assert torch.allclose(probs[row].double(), expected, atol=1e-6)


def test_draws_over_a_large_vocabulary_follow_the_filtered_distribution() -> None:
    # the candidates' draws mapped back to token ids: frequencies against the distribution
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 4
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.0)
    expected = _reference_probs(logits, 1.0, 20, 0.9, 0.0)
    draws = sample(logits.expand(40000, 5000), params, make_generator(torch.device("cpu"), 2))
    freq = torch.bincount(draws, minlength=5000).double() / draws.numel()
    assert set(draws.unique().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert torch.allclose(freq, expected, atol=0.01), (freq - expected).abs().max()


def test_multinomial_never_draws_a_token_of_probability_zero() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0]).expand(20000, 6)
    draws = multinomial(probs, make_generator(torch.device("cpu"), 4))
    assert set(draws.unique().tolist()) == {1, 4}
    tiny = torch.tensor([0.0, 1e-30, 0.0, 1.0, 0.0])  # float64 sums keep the tiny token's share
    assert multinomial(tiny.expand(1000, 5), make_generator(torch.device("cpu"), 4)).eq(3).all()


def test_seed_reproduces_and_differs() -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    logits = torch.zeros(64, 100)

    def run(seed: int) -> list[int]:
        return sample(logits, params, make_generator(torch.device("cpu"), seed)).tolist()

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampling_without_generator_is_an_error() -> None:
    with pytest.raises(InvalidArgumentError):
        sample(LOGITS, SamplingParams(temperature=1.0))


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": -0.2},
    {"top_k": -1}, {"top_k": 2.5},
    {"min_p": -0.1}, {"min_p": 1.1},
    {"repeat_penalty": 0.0}, {"repeat_penalty": -1.0},
    {"repeat_last_n": -1}, {"seed": -3},
])
def test_invalid_params_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidArgumentError):
        SamplingParams(**kwargs)


def test_valid_edges_accepted() -> None:
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    SamplingParams(min_p=1.0, top_p=1e-6)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repeat_penalty"])
def test_integers_past_float_range_are_refused(field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**{field: 10**400})
