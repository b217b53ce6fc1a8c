"""The Llama transformer with fused QKV and gate/up projections. No I/O and no sampling here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llamarun.config import ModelArgs
from llamarun.device import attention_dtype, linear
from llamarun.kv_cache import KVCache
from llamarun.rope import apply_rope, rope_cache
from llamarun.slots import SlotPool


class Linear(nn.Linear):
    """A bias-free nn.Linear whose one-token product, under torch.compile, is multiply + sum.

    Inductor turns (x * W).sum(-1) into one fused reduction that streams the weights at memory
    bandwidth; the vendor GEMV it would call instead reaches about half of it on CPU (on GPUs
    inductor makes the same rewrite itself). Eager mode uses device.linear.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if torch.compiler.is_compiling() and rows == 1:
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return linear(x, self.weight)


@dataclass(frozen=True)
class DecodeRows:
    """One new token for each of several cache rows (batched decoding).

    rows (B,) long: the KV cache row of each sequence; pos (B,) long: the new token's position in
    its row; lengths: pos + 1 as Python ints (each row attends over exactly its own past).
    """

    rows: torch.Tensor
    pos: torch.Tensor
    row_ids: tuple[int, ...]
    lengths: tuple[int, ...]


Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums partial results across tensor-parallel ranks


class VocabShard(Protocol):
    """How a tensor-parallel rank holds part of the vocabulary (see llamarun.parallel)."""

    def embed(self, table: nn.Module, tokens: torch.Tensor) -> torch.Tensor: ...

    def gather(self, logits: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class Attention(nn.Module):
    """Grouped-query attention with one fused Q/K/V projection and SDPA."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = Linear(args.dim, qkv_out)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.kv_cache: KVCache | None = None
        self.reduce: Reduce | None = None  # tensor parallelism: sums the ranks' partial outputs

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor | None, kv_len: int | None, row: int = 0,
                batch: DecodeRows | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        qk, v = self.wqkv(x).split([q_size + kv_size, kv_size], dim=-1)
        # One rotation for the query and key heads together: half the small ops of two.
        qk = apply_rope(qk.view(bsz, seqlen, self.n_heads + self.n_kv_heads, self.head_dim), freqs)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, head_dim)
        gqa = self.n_heads != self.n_kv_heads
        if self.kv_cache is not None:
            dt = self.kv_cache.k_cache.dtype  # attention may run wider than the model
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
            if batch is not None:
                y = self._attend_rows(q, k, v, batch)
                return self._out(y.transpose(1, 2).reshape(bsz, seqlen, q_size).to(x.dtype))
            k, v = self.kv_cache.update(input_pos, k, v, row=row)  # (B, kv heads, max_seq_len, hd)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self._out(y.transpose(1, 2).reshape(bsz, seqlen, q_size).to(x.dtype))

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        out = self.wo(y)
        return out if self.reduce is None else self.reduce(out)


    def _attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     batch: DecodeRows) -> torch.Tensor:
        """Write one token per row and attend each row over exactly its own past, one row at a
        time: a row's result never depends on the other rows (batch-invariant), and equals a
        one-row batch's bit for bit."""
        assert self.kv_cache is not None
        k_all, v_all = self.kv_cache.write_rows(batch.rows, batch.pos, k, v)
        gqa = self.n_heads != self.n_kv_heads
        out = [F.scaled_dot_product_attention(q[i:i + 1], k_all[r:r + 1, :, :n], v_all[r:r + 1, :, :n],
                                              enable_gqa=gqa)
               for i, (r, n) in enumerate(zip(batch.row_ids, batch.lengths))]
        return out[0] if len(out) == 1 else torch.cat(out)


class FeedForward(nn.Module):
    """SwiGLU with one fused gate/up projection (w13) and the down projection (w2)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.reduce: Reduce | None = None  # tensor parallelism: sums the ranks' partial outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        out = self.w2(F.silu(gate) * up)
        return out if self.reduce is None else self.reduce(out)


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with residual connections."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor | None, kv_len: int | None, row: int = 0,
                batch: DecodeRows | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, input_pos, mask, kv_len, row, batch)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A Llama model. Call setup_caches() before forward()."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.slots = SlotPool(1)  # what each row of the KV cache holds (see setup_caches)
        self.vocab: VocabShard | None = None  # tensor parallelism: this rank's part of the vocab
        self.register_buffer("freqs", torch.empty(0), persistent=False)
        self.register_buffer("positions", torch.empty(0, dtype=torch.long), persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, *,
                     use_kv_cache: bool = True) -> None:
        """Allocate the RoPE table and a KV cache per layer with max_batch_size rows (slots) of
        max_seq_len positions; `slots` then describes the (empty) rows."""
        weight = self.norm.weight  # dense in the model's dtype, whatever the projections are
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.slots = SlotPool(max_batch_size)
        a = self.args
        self.freqs = rope_cache(max_seq_len, a.head_dim, a.rope_theta, a.rope_scaling,
                                device=weight.device)
        self.positions = torch.arange(max_seq_len, device=weight.device)
        for layer in self.layers:
            layer.attention.kv_cache = None  # free the old cache before allocating the new one
            if use_kv_cache:
                layer.attention.kv_cache = KVCache(  # a tensor-parallel rank: its KV heads only
                    max_batch_size, max_seq_len, layer.attention.n_kv_heads, a.head_dim,
                    dtype=attention_dtype(weight.device, weight.dtype), device=weight.device)

    def reset_caches(self) -> None:
        """Zero every layer's KV cache."""
        self.slots.clear()
        for layer in self.layers:
            if layer.attention.kv_cache is not None:
                layer.attention.kv_cache.reset()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *,
                output_idx: torch.Tensor | None = None, kv_len: int | None = None,
                kv_exact: bool = False, row: int = 0) -> torch.Tensor:
        """Logits for tokens (B, S) at positions input_pos (S,), cached in rows row..row+B-1.

        output_idx selects the sequence positions whose logits are computed (all when None);
        kv_len, a Python int >= input_pos.max() + 1, limits attention to the first kv_len cache
        slots (a speed hint for eager decoding; None attends over the whole static cache).
        kv_exact says that S == 1 and kv_len == input_pos[0] + 1: every attended slot is in the
        past, so no mask is built. Without a KV cache, input_pos must start at 0 (plain causal
        attention).
        """
        if self.freqs.numel() == 0:
            raise RuntimeError("call setup_caches() before forward()")
        cached = self.layers[0].attention.kv_cache is not None
        if cached and row + tokens.shape[0] > self.max_batch_size:
            raise ValueError(f"a batch of {tokens.shape[0]} from row {row} exceeds the KV cache's "
                             f"max batch size {self.max_batch_size} (see setup_caches)")
        freqs = self.freqs[input_pos]  # (S, head_dim // 2, 2)
        mask = None
        if cached and not (kv_exact and tokens.shape[1] == 1 and kv_len is not None):
            keys = self.positions if kv_len is None else self.positions[:kv_len]
            mask = keys[None, :] <= input_pos[:, None]  # (S, kv_len): causal over cache slots
        h = self._embed(tokens)  # (B, S, dim)
        for layer in self.layers:
            h = layer(h, freqs, input_pos, mask, kv_len, row)
        if output_idx is not None:
            h = h[:, output_idx]
        return self._logits(h)  # (B, len(output_idx) or S, vocab)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return self.tok_embeddings(tokens)
        return self.vocab.embed(self.tok_embeddings, tokens)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(h)).float()
        return logits if self.vocab is None else self.vocab.gather(logits)

    def decode(self, tokens: torch.Tensor, rows: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits (B, vocab) after feeding tokens (B,) at positions[i] of cache rows[i].

        Each row attends over exactly its own past, and every product treats rows independently
        where the device allows (device.linear): a row's logits do not depend on the batch.
        """
        if self.freqs.numel() == 0 or self.layers[0].attention.kv_cache is None:
            raise RuntimeError("call setup_caches() with a KV cache before decode()")
        device = self.positions.device
        batch = DecodeRows(rows=torch.tensor(list(rows), dtype=torch.long, device=device),
                           pos=torch.tensor(list(positions), dtype=torch.long, device=device),
                           row_ids=tuple(rows), lengths=tuple(p + 1 for p in positions))
        freqs = self.freqs[batch.pos][:, None]  # (B, 1, head_dim // 2, 2)
        h = self._embed(tokens.view(-1, 1))  # (B, 1, dim)
        for layer in self.layers:
            h = layer(h, freqs, batch.pos, None, None, 0, batch)
        return self._logits(h)[:, 0]
