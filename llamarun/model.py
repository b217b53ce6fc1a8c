"""The Llama transformer with fused QKV and gate/up projections. No I/O and no sampling here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llamarun import kernels
from llamarun.config import ModelArgs
from llamarun.device import attention_dtype, linear
from llamarun.kv_cache import KVCache
from llamarun.rope import apply_rope, rope_cache


class Linear(nn.Linear):
    """A bias-free nn.Linear: device.linear, except for one token under torch.compile where no
    llamarun kernel serves (llamarun.kernels.serves_dense), which is multiply + sum.

    Inductor turns (x * W).sum(-1) into one fused reduction that streams the weights at memory
    bandwidth; the vendor GEMV it would call instead reaches about half of it on CPU (on GPUs
    inductor makes the same rewrite itself). The kernels stream as fast and compute each row
    as in any batch, which the reduction does not.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if torch.compiler.is_compiling() and rows == 1 and not kernels.serves_dense(x, self.weight):
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return linear(x, self.weight)  # llamarun.kernels' product where one serves

    def kernel_product(self, x: torch.Tensor) -> kernels.Product | None:
        """The product forward(x) hands a llamarun kernel, for kernels.decode_layers; None where
        it takes another path."""
        return kernels.dense_product(x, self.weight)


@dataclass(frozen=True)
class Span:
    """One sequence's part of a step: `length` new tokens written at positions start.. of cache
    row `row`, each attending over that row's positions 0..its own (and nothing else)."""

    row: int
    start: int
    length: int

    @property
    def end(self) -> int:
        """One past the position of the span's last token."""
        return self.start + self.length


Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums partial results across tensor-parallel ranks
# Transformer._parts' answer: the layers and layer stacks of a kind of pass, whether the last
# stack holds the head and whether the first holds the embedding
Parts = tuple[Sequence["TransformerBlock | Any"], bool, bool]


class VocabShard(Protocol):
    """How a tensor-parallel rank holds part of the vocabulary (see llamarun.parallel)."""

    def embed(self, table: nn.Module, tokens: torch.Tensor) -> torch.Tensor: ...

    def gather(self, logits: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 (float32 rows on CPU: by
    kernels.rms_norm, in eager and compiled passes alike)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.serves_rowwise(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
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

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, step: Step | None) -> torch.Tensor:
        """x (1, T, dim): T tokens, either one causal sequence at positions 0.. (step None: no
        cache) or the spans of `step` packed one after another."""
        _, n_tokens, _ = x.shape
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        qkv = self.wqkv(x)
        cache = self.kv_cache
        if (step is not None and cache is not None and not torch.compiler.is_compiling()
                and kernels.serves_rope(qkv, cache.k_cache)):
            # eager on CPU: rotation and cache write in one kernel call, then attention in one
            # (compiled passes take PyTorch's form below, which inductor fuses: the same bits,
            # float32 or bfloat16 heads; measured faster there than a call of the kernel)
            q = kernels.rope_write(qkv[0], freqs, cache.k_cache, cache.v_cache, step.rows,
                                   step.pos, self.n_heads)
            y = kernels.attend(q, cache.k_cache, cache.v_cache, step.rows, step.pos,
                               self.head_dim ** -0.5)
            out = self.wo(y.view(1, n_tokens, q_size).to(x.dtype))
            return out if self.reduce is None else self.reduce(out)
        qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
        # One rotation for the query and key heads together: half the small ops of two. With a
        # cache, the rotated heads come out in the attention's dtype, as rope_write's do: float32
        # where kernels.attend serves the cache (a bfloat16 cache's keys are rounded as they are
        # written), else the cache's.
        out_dtype = None
        if step is not None and cache is not None:
            out_dtype = torch.float32 if kernels.serves_cache(cache.k_cache) else cache.k_cache.dtype
        qk = apply_rope(qk.view(1, n_tokens, self.n_heads + self.n_kv_heads, self.head_dim), freqs,
                        out_dtype)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)  # (1, T, heads, head_dim)
        v = v.view(1, n_tokens, self.n_kv_heads, self.head_dim)
        if step is None:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=n_tokens > 1,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
            y = y.transpose(1, 2)
        else:
            assert self.kv_cache is not None
            y = self._attend_spans(q, k, v, step)
        out = self.wo(y.reshape(1, n_tokens, q_size).to(x.dtype))
        return out if self.reduce is None else self.reduce(out)

    def _attend_spans(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      step: Step) -> torch.Tensor:
        """Write each token's key and value into the cache, then attend each span over exactly
        its own row's past, so that a span's result never depends on the others
        (batch-invariant, bit for bit; one SDPA call over padded rows is not: its result
        changes in the last bits with the padded length and the batch size, measured).

        Where kernels.attend serves (float32 or bfloat16 caches on CPU) every token of the
        pass goes through it in one call, each token computed alone: a token's result depends
        neither on its pass nor on how its prompt was cut into chunks (decode rows,
        verifications, prompt chunks and whole prompts alike). Elsewhere each span takes one
        SDPA call.

        q (1, T, heads, head_dim), k and v (1, T, kv heads, head_dim); returns (1, T, heads,
        head_dim). (Each query keeps the (1, S, heads, hd) -> (1, heads, S, hd) view: CPU SDPA
        runs 10x slower on other strides of the same shape, measured.)
        """
        assert self.kv_cache is not None
        dt = self.kv_cache.k_cache.dtype  # attention may run wider than the model
        k_all, v_all = self.kv_cache.write(step.rows, step.pos, k[0].to(dt), v[0].to(dt))
        if kernels.serves_attention(q, k_all):  # float32 queries, whatever the cache holds
            y = kernels.attend(q[0], k_all, v_all, step.rows, step.pos, self.head_dim ** -0.5)
            return y[None]
        q = q.to(dt)
        if step.window:
            return self._attend_window(q, k_all, v_all, step)
        gqa = self.n_heads != self.n_kv_heads
        out = []
        offset = 0
        for span, mask in zip(step.spans, step.masks):
            row = span.row - step.row_bias
            qs = q[:, offset:offset + span.length].transpose(1, 2)  # (1, H, length, hd)
            ks = k_all[row:row + 1, :, :span.end]  # (1, kv heads, end, hd)
            vs = v_all[row:row + 1, :, :span.end]
            y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
            out.append(y.transpose(1, 2))
            offset += span.length
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _attend_window(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                       step: Step) -> torch.Tensor:
        """One token per row, each attending over the first step.window positions of its row
        masked to its own past (step.masks[0], (B, 1, 1, window)): one SDPA call for the pass,
        whose shapes depend only on the batch size and the window (what a CUDA graph needs).
        A row's query heads sharing a KV head are that call's query positions (no GQA
        expansion of the cache)."""
        b = q.shape[1]
        group = self.n_heads // self.n_kv_heads
        ks = k_all[:, :, :step.window].index_select(0, step.rows)  # (B, kv heads, window, hd)
        vs = v_all[:, :, :step.window].index_select(0, step.rows)
        qs = q[0].reshape(b, self.n_kv_heads, group, self.head_dim)
        y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=step.masks[0])
        return y.reshape(1, b, self.n_heads, self.head_dim)


@dataclass(frozen=True)
class Step:
    """The cache side of one forward pass over packed spans (see Transformer.forward_spans).

    rows, pos (T,) long: the cache row and position of every token; spans: each sequence's part,
    with `row_bias` added to its row (a compiled step passes rows >= 2: torch.compile would
    specialize its graph on a row index of 0 or 1); masks: per span, None (it may attend to its
    whole past: one token) or its (length, end) causal mask. With a `window`, spans are empty
    and masks holds one (B, 1, 1, window) mask: row i sees its positions <= pos[i].
    """

    rows: torch.Tensor
    pos: torch.Tensor
    spans: tuple[Span, ...]
    masks: tuple[torch.Tensor | None, ...]
    row_bias: int = 0
    window: int = 0  # > 0: one token a row, over that many positions (Attention._attend_window)


class FeedForward(nn.Module):
    """SwiGLU with one fused gate/up projection (w13) and the down projection (w2)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.reduce: Reduce | None = None  # tensor parallelism: sums the ranks' partial outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)
        if kernels.serves_rowwise(gate_up):  # silu(gate) * up in eager and compiled passes alike
            hidden = kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        out = self.w2(hidden)
        return out if self.reduce is None else self.reduce(out)


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with residual connections."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, step: Step | None) -> torch.Tensor:
        """The layer op by op (Transformer runs it through kernels.decode_layers instead where
        fused_operands says it can)."""
        h = x + self.attention(self.attention_norm(x), freqs, step)
        return h + self.feed_forward(self.ffn_norm(h))

    def fused_operands(self, x: torch.Tensor) -> kernels.LayerOperands | None:
        """The layer's operands for kernels.decode_layers in passes like x's (kernels.layer_pass
        not None), where each of its ops would run one of llamarun's kernels anyway: the same
        numbers with a fraction of the calls. None where it runs op by op: no KV cache, a
        tensor-parallel rank's layer (its partial outputs are summed between the ops), a norm
        or product no kernel serves."""
        attention, ffn = self.attention, self.feed_forward
        cache = attention.kv_cache
        norms = (self.attention_norm.weight, self.ffn_norm.weight)
        if (cache is None or attention.reduce is not None or ffn.reduce is not None
                or self.attention_norm.eps != self.ffn_norm.eps
                or not kernels.serves_layer(x, cache.k_cache, *norms)):
            return None
        products = []
        for module in (attention.wqkv, attention.wo, ffn.w13, ffn.w2):
            product = module.kernel_product(x) if hasattr(module, "kernel_product") else None
            if product is None:
                return None
            products.append(product)
        q_kv, out, gate_up, down = products
        return kernels.LayerOperands(*norms, self.attention_norm.eps, (q_kv, out, gate_up, down),
                                     cache.k_cache, cache.v_cache, attention.n_heads,
                                     attention.head_dim ** -0.5)


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
        self.vocab: VocabShard | None = None  # tensor parallelism: this rank's part of the vocab
        self.register_buffer("freqs", torch.empty(0), persistent=False)
        self.register_buffer("positions", torch.empty(0, dtype=torch.long), persistent=False)
        # _parts' answer per kind of pass (kernels.layer_pass): the modules and their weights
        # never change after loading, so each kind is asked once (setup_caches forgets them:
        # the stacks hold the caches)
        self._parts_by_kind: dict[tuple, Parts] = {}  # type: ignore[type-arg]
        self._kv_cached = False  # setup_caches allocated KV caches (has_kv_cache: a plain bool,
        # read by every pass; the layers' modules take four lookups)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, *,
                     use_kv_cache: bool = True) -> None:
        """Allocate the RoPE table and a KV cache per layer with max_batch_size rows of
        max_seq_len positions (which rows hold what is the business of a CacheManager)."""
        weight = self.norm.weight  # dense in the model's dtype, whatever the projections are
        self._parts_by_kind.clear()
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        a = self.args
        self.freqs = rope_cache(max_seq_len, a.head_dim, a.rope_theta, a.rope_scaling,
                                device=weight.device)
        self.positions = torch.arange(max_seq_len, device=weight.device)
        self._kv_cached = use_kv_cache
        for layer in self.layers:
            layer.attention.kv_cache = None  # free the old cache before allocating the new one
            if use_kv_cache:
                layer.attention.kv_cache = KVCache(  # a tensor-parallel rank: its KV heads only
                    max_batch_size, max_seq_len, layer.attention.n_kv_heads, a.head_dim,
                    dtype=attention_dtype(weight.device, weight.dtype), device=weight.device)

    def reset_caches(self) -> None:
        """Zero every layer's KV cache."""
        for layer in self.layers:
            if layer.attention.kv_cache is not None:
                layer.attention.kv_cache.reset()

    @property
    def has_kv_cache(self) -> bool:
        """Whether setup_caches() allocated a KV cache."""
        return self._kv_cached

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *,
                output_idx: torch.Tensor | None = None, kv_len: int | None = None,
                row: int = 0) -> torch.Tensor:
        """Logits (B, len(output_idx) or S, vocab) for tokens (B, S) at the consecutive positions
        input_pos (S,), written in cache rows row..row+B-1 (a convenience over forward_spans;
        kv_len is accepted for compatibility and ignored: every span attends over exactly its
        past). Without a KV cache, input_pos must start at 0 (plain causal attention).
        """
        if self.freqs.numel() == 0:
            raise RuntimeError("call setup_caches() before forward()")
        bsz, seqlen = tokens.shape
        start = int(input_pos[0]) if seqlen else 0
        if not self.has_kv_cache:
            if start != 0:
                raise ValueError("without a KV cache, a forward pass starts at position 0")
            return torch.stack([self._run(tokens[b], input_pos, None, output_idx)
                                for b in range(bsz)])
        if row + bsz > self.max_batch_size:
            raise ValueError(f"a batch of {bsz} from row {row} exceeds the KV cache's "
                             f"max batch size {self.max_batch_size} (see setup_caches)")
        spans = [Span(row + b, start, seqlen) for b in range(bsz)]
        idx = None
        if output_idx is not None:
            idx = torch.cat([output_idx + b * seqlen for b in range(bsz)])
        logits = self.forward_spans(tokens.reshape(-1), spans, output_idx=idx)
        return logits.view(bsz, -1, logits.shape[-1])

    def make_step(self, spans: Sequence[Span], *, row_bias: int = 0) -> Step:
        """The cache side of a forward pass over `spans` (their rows given with row_bias added)."""
        device = self.positions.device
        rows = torch.tensor([s.row - row_bias for s in spans for _ in range(s.length)],
                            dtype=torch.long, device=device)
        pos = torch.cat([self.positions[s.start:s.end] for s in spans]) if len(spans) > 1 else \
            self.positions[spans[0].start:spans[0].end]
        masks = tuple(None if s.length == 1 else
                      self.positions[None, :s.end] <= self.positions[s.start:s.end, None]
                      for s in spans)
        return Step(rows, pos, tuple(spans), masks, row_bias)

    def forward_spans(self, tokens: torch.Tensor, spans: Sequence[Span], *,
                      output_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (len(output_idx) or T, vocab) for the packed tokens (T,) of `spans`: span i's
        tokens follow span i-1's, and are written at positions span.start.. of cache row span.row.

        Every product treats tokens independently (device.linear) and every span attends over
        exactly its own past, so a span's logits do not depend on the other spans. This one
        forward serves prefill (a span of many tokens), decoding (many spans of one) and
        verification (spans of a few).
        """
        if not self._kv_cached:  # (setup_caches made the RoPE table too)
            raise RuntimeError("call setup_caches() with a KV cache before forward_spans()")
        total = sum(s.length for s in spans)
        if tokens.shape != (total,):
            raise ValueError(f"{tuple(tokens.shape)} tokens for spans of {total} in all")
        for s in spans:
            if s.length < 1 or s.start < 0 or s.end > self.max_seq_len:
                raise ValueError(f"span {s} does not fit in the KV cache of {self.max_seq_len}")
            if not 0 <= s.row < self.max_batch_size:
                raise ValueError(f"span {s}: row outside the KV cache's {self.max_batch_size} rows")
        step = self.make_step(spans)
        with kernels.shortest_part(min((s.length for s in spans), default=0)):  # (products by size)
            return self.run_step(tokens, step, output_idx)

    def run_step(self, tokens: torch.Tensor, step: Step,
                 output_idx: torch.Tensor | None = None) -> torch.Tensor:
        """forward_spans with its Step made already (the function a compiled step traces)."""
        return self._run(tokens, step.pos, step, output_idx)

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor, step: Step | None,
             output_idx: torch.Tensor | None) -> torch.Tensor:
        """The pass over tokens at positions pos (their rows of the RoPE table)."""
        parts, headed, embeds = self._parts(tokens, step)
        # (1, T, dim), or the ids where the first layer stack embeds them
        h = tokens[None] if embeds else self._embed(tokens)[None]
        freqs = None  # the tokens' rows of the table, where a layer runs op by op
        for i, part in enumerate(parts):
            if isinstance(part, TransformerBlock):
                if freqs is None:
                    freqs = self.freqs[pos]
                h = part(h, freqs, step)
                continue
            assert step is not None
            if headed and output_idx is None and i == len(parts) - 1:  # and the head: logits
                return kernels.decode_logits(h, part, self.freqs, step.rows, step.pos)[0]
            h = kernels.decode_layers(h, part, self.freqs, step.rows, step.pos)
        if output_idx is not None:
            h = h[:, output_idx]
        return self._logits(h)[0]  # (T or len(output_idx), vocab)

    def _parts(self, tokens: torch.Tensor, step: Step | None) -> Parts:
        """The layers of a pass over tokens in order, each run of consecutive layers that
        kernels.decode_layers can take (TransformerBlock.fused_operands) as one
        kernels.layer_stack in place of their modules: eager passes on CPU over a KV cache, one
        call for all layers of a model whose every layer qualifies. And whether the last part is
        such a stack holding the final norm and output product too (head_operands), for
        kernels.decode_logits; and whether the first is one holding the embedding
        (embedding_operands), which then takes the token ids."""
        if step is None or step.window:
            return self.layers, False, False
        key = kernels.layer_pass(tokens, self.norm.weight.dtype)  # (the hidden states' dtype)
        if key is None:
            return self.layers, False, False
        known = self._parts_by_kind.get(key)
        if known is None:  # the first pass of its kind: every later one reuses the answer
            x = self._embed(tokens)[None]
            embedding = self.embedding_operands(x)
            parts, run = [], []

            def stack(head: kernels.HeadOperands | None = None) -> Any:
                # the embedding goes to the first part only, a stack where layer 0 begins one
                return kernels.layer_stack(run, head, None if parts else embedding)

            for layer in self.layers:
                operands = layer.fused_operands(x)
                if operands is not None:
                    run.append(operands)
                    continue
                if run:
                    parts.append(stack())
                    run = []
                parts.append(layer)
            head = self.head_operands(x) if run else None
            if run:
                parts.append(stack(head))
            embeds = embedding is not None and not isinstance(parts[0], TransformerBlock)
            known = self._parts_by_kind[key] = (parts, head is not None, embeds)
        return known

    def fuses_decode(self) -> bool:
        """Whether an eager pass of one decode token runs every layer, the embedding and the
        head through llamarun's fused kernels (one kernels.decode_logits call: _parts)."""
        if not self._kv_cached:  # (setup_caches made the RoPE table too)
            return False
        tokens = torch.zeros(1, dtype=torch.long, device=self.positions.device)
        with torch.inference_mode(), kernels.shortest_part(1):  # (forward_spans' kind of pass)
            parts, headed, embeds = self._parts(tokens, self.make_step([Span(0, 0, 1)]))
        return headed and embeds and len(parts) == 1

    def embedding_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The embedding's (table, scales) for kernels.layer_stack, where its rows are x's
        dtype (a plain table, or Int8Embedding's); None for a tensor-parallel rank's part of
        the vocabulary."""
        table = self.tok_embeddings
        if self.vocab is not None:
            return None
        if type(table) is nn.Embedding:
            return (table.weight, table.weight[:0]) if table.weight.dtype == x.dtype else None
        kernel_table = getattr(table, "kernel_table", None)
        return kernel_table(x.dtype) if kernel_table is not None else None

    def head_operands(self, x: torch.Tensor) -> kernels.HeadOperands | None:
        """The final norm and output product for kernels.decode_logits in passes like x's (a
        layer's output), where _logits would run llamarun's kernels on them anyway; None where
        it would not, or where a tensor-parallel rank gathers its part of the vocabulary."""
        product = (self.output.kernel_product(x) if hasattr(self.output, "kernel_product")
                   else None)
        if self.vocab is not None or product is None or not kernels.serves_rowwise(
                x, self.norm.weight):
            return None
        return kernels.HeadOperands(self.norm.weight, self.norm.eps, product)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return self.tok_embeddings(tokens)
        return self.vocab.embed(self.tok_embeddings, tokens)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(h)).float()
        return logits if self.vocab is None else self.vocab.gather(logits)
