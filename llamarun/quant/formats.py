"""Weight storage formats and the pure functions that convert between them.

A linear weight is stored dense (in the model's dtype), as int8 with one scale per output row, or
as 4-bit values in groups along the input dimension with a scale and an offset per group:
    int8:  w[n, k] = q[n, k] * scale[n]                              q in -127..127
    int4:  w[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]    q in 0..15
The int4 convention is PyTorch's (`_weight_int4pack_mm`), so GGUF Q4_0, Q4_1 and Q4_K blocks
map onto it exactly (see gguf_int4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: "dense", "int8" (per row) or "int4" (groupwise; symmetric: every
    zero is 0, as in GGUF's Q4_0, so that none is stored or read where the layout allows)."""

    kind: str
    group_size: int = 0  # int4 only
    symmetric: bool = False  # int4 only

    def __str__(self) -> str:
        return f"int4 (group {self.group_size})" if self.kind == "int4" else self.kind


DENSE = WeightFormat("dense")
INT8 = WeightFormat("int8")


@dataclass
class Int8Parts:
    """A per-row int8 weight: q (N, K) int8 and scale (N,) float32."""

    q: torch.Tensor
    scale: torch.Tensor


@dataclass
class Int4Parts:
    """An unpacked groupwise 4-bit weight: q (N, K) uint8 in 0..15, scale and zero (N, K // g)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]


_CHUNK_ROWS = 4096  # rows converted at once: bounds the float32 temporaries


def quantize_int8(w: torch.Tensor) -> Int8Parts:
    """Symmetric per-row int8 of a (N, K) float weight."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], _CHUNK_ROWS):
        wf = w[i:i + _CHUNK_ROWS].float()
        s = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (rows,)
        q[i:i + _CHUNK_ROWS] = torch.round(wf / s[:, None]).clamp_(-127, 127)
        scale[i:i + _CHUNK_ROWS] = s
    return Int8Parts(q, scale)


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Parts:
    """Asymmetric groupwise 4-bit of a (N, K) float weight (min/max per group of group_size)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    lo = wg.amin(dim=-1)
    hi = wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)  # (N, G)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    zero = lo + 8.0 * scale  # so that (q - 8) * scale + zero == q * scale + lo
    return Int4Parts(q.reshape(n, k), scale, zero)


def dequantize_int8(p: Int8Parts) -> torch.Tensor:
    """The float32 weight an Int8Parts stands for."""
    return p.q.float() * p.scale.float()[:, None]


def dequantize_int4(p: Int4Parts) -> torch.Tensor:
    """The float32 weight an Int4Parts stands for."""
    n, k = p.q.shape
    g = p.group_size
    q = p.q.float().reshape(n, k // g, g) - 8.0
    return (q * p.scale.float()[..., None] + p.zero.float()[..., None]).reshape(n, k)


def cat_int4(parts: list[Int4Parts]) -> Int4Parts:
    """Stack int4 weights with the same group size along the output rows (a fused projection)."""
    return Int4Parts(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                     torch.cat([p.zero for p in parts]))


# GGUF blocks of 4-bit values that are exactly an affine map of q per 32 values.
_Q4_0, _Q4_1, _Q4_K = 2, 3, 12  # GGMLQuantizationType values
GGUF_INT4_TYPES = frozenset({_Q4_0, _Q4_1, _Q4_K})
GGUF_SYMMETRIC_INT4_TYPES = frozenset({_Q4_0})  # those whose zeros gguf_int4 makes all 0


def gguf_int4(raw: np.ndarray, qtype: int, shape: tuple[int, int]) -> Int4Parts:
    """Q4_0 / Q4_1 / Q4_K blocks (raw uint8 bytes of a (N, K) tensor) as exact group-32 Int4Parts."""
    n, k = shape
    if qtype == _Q4_0:  # 18 bytes: f16 d, 16 bytes of nibbles; w = d * (q - 8)
        blocks = raw.reshape(-1, 18)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        q = _nibbles_q4(blocks[:, 2:])
        scale, zero = d, np.zeros_like(d)
    elif qtype == _Q4_1:  # 20 bytes: f16 d, f16 m, 16 bytes; w = d * q + m
        blocks = raw.reshape(-1, 20)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        q = _nibbles_q4(blocks[:, 4:])
        scale, zero = d, m + 8.0 * d
    elif qtype == _Q4_K:  # 144 bytes per 256: f16 d, f16 dmin, 12 bytes of 6-bit scales, 128 bytes
        blocks = raw.reshape(-1, 144)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = _q4k_scale_min(blocks[:, 4:16])
        sub_d = (d * sc).reshape(-1)  # one per 32 values: w = d * sc * q - dmin * m
        sub_m = (dmin * mn).reshape(-1)
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 32)
        scale, zero = sub_d, 8.0 * sub_d - sub_m
    else:
        raise ValueError(f"GGML type {qtype} is not a 4-bit type with an exact int4 form")
    g = k // 32
    return Int4Parts(torch.from_numpy(np.ascontiguousarray(q).reshape(n, k)),
                     torch.from_numpy(np.ascontiguousarray(scale).reshape(n, g)),
                     torch.from_numpy(np.ascontiguousarray(zero).reshape(n, g)))


def _nibbles_q4(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 16-byte payloads -> (blocks, 32) values: low nibbles first, then high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 bytes into 8 six-bit scales and 8 six-bit mins per super-block."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)
