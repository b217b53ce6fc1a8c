"""Rotary position embeddings in Meta's interleaved-pair convention, with Llama 3.1 scaling."""

from __future__ import annotations

import math

import torch

from llamarun.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, scaled as the config says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).float()
    # "llama3": keep high frequencies, divide low ones by `factor`, blend in between.
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
    out = torch.where(wavelen < high_wavelen, inv_freq, out)
    return out.float()


def rope_cache(max_seq_len: int, head_dim: int, theta: float, scaling: RopeScaling | None,
               *, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin tables stacked: (max_seq_len, head_dim // 2, 2), float32."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)  # (S, head_dim // 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, S, H, head_dim) by freqs (S or B, S, head_dim // 2, 2),
    in float32; the result in `dtype` (default x's). The model asks for its attention's dtype:
    on CPU float32, so bfloat16 heads are rotated without a round trip through bfloat16, which
    torch.compile's code would leave out where eager PyTorch rounds (compiled and eager passes
    would then differ in the last bits)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, head_dim // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    if freqs.dim() == 3:  # the same positions for every sequence
        freqs = freqs[None]
    cos = freqs[:, :, None, :, 0]
    sin = freqs[:, :, None, :, 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype if dtype is None else dtype)
