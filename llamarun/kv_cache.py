"""KVCache: keys and values for every position, allocated once and written in place."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Per-layer cache of shape (max_batch_size, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)

    def write(self, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write packed tokens: k, v (T, n_kv_heads, head_dim) at pos[i] of rows[i]; return the
        whole caches."""
        self.k_cache[rows, :, pos] = k
        self.v_cache[rows, :, pos] = v
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        """Zero the cache (a new conversation)."""
        self.k_cache.zero_()
        self.v_cache.zero_()
