"""Test helpers: write Llama GGUF files with gguf.GGUFWriter, including K-quants built with numpy.

gguf-py can quantize F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 but only dequantize the K-quants,
so Q4_K, Q5_K and Q6_K blocks are packed here (simple min/max scales, llama.cpp's bit layout);
`gguf.quants.dequantize` reading them back within quantization error proves the blocks valid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from llamarun.config import ModelArgs
from llamarun.loaders.fuse import RawCheckpoint, build_state_dict, expected_shapes
from llamarun.model import Transformer

QK_K = 256

_GGUF_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}


def gguf_name(meta_name: str) -> str:
    """llama.cpp's tensor name for a Meta name."""
    if meta_name in _TOP:
        return _TOP[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"blk.{i}.{_GGUF_NAMES[rest]}"


# ---- K-quant packing (inverse of gguf.quants' dequantize_blocks) ----

def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins per block into Q4_K/Q5_K's 12 bytes."""
    n = sc.shape[0]
    out = np.zeros((n, 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _affine_k(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per-32 sub-block scale/min (6-bit, relative to fp16 super-scales) and codes in 0..levels."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / levels
    d = _f16(scale.max(-1) / 63)
    dmin = _f16((-lo).max(-1) / 63)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dminf > 0, np.rint(-lo / dminf), 0).clip(0, 63).astype(np.uint8)
        step = (df * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dminf * mn)[..., None]) / step), 0)
    q = q.clip(0, levels).astype(np.uint8)  # (n, 8, 32)
    return d, dmin, sc, mn, q


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) Q4_K blocks."""
    d, dmin, sc, mn, q = _affine_k(blocks, 15)
    n = blocks.shape[0]
    qs = np.zeros((n, 128), dtype=np.uint8)
    for j in range(8):
        c, h = divmod(j, 2)
        qs[:, 32 * c:32 * c + 32] |= q[:, j] << (4 * h)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                           _scale_min_k4(sc, mn), qs], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 176) Q5_K blocks."""
    d, dmin, sc, mn, q = _affine_k(blocks, 31)
    n = blocks.shape[0]
    qs = np.zeros((n, 128), dtype=np.uint8)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        c, h = divmod(j, 2)
        qs[:, 32 * c:32 * c + 32] |= (q[:, j] & 0x0F) << (4 * h)
        qh |= ((q[:, j] >> 4) & 1) << j
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                           _scale_min_k4(sc, mn), qh, qs], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) Q6_K blocks (16 signed 8-bit scales, 6-bit codes)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = _f16(scale.max(-1) / 127)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(-128, 127).astype(np.int8)
        step = (df * sc)[..., None]
        q = np.where(step != 0, np.rint(sub / step), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(n, 8, 32)  # rows of 32 in value order
    ql = np.zeros((n, 128), dtype=np.uint8)
    qh = np.zeros((n, 64), dtype=np.uint8)
    for r in range(8):
        half, nib, part = r // 4, (r % 4) // 2, r % 2
        ql[:, half * 64 + part * 32:half * 64 + part * 32 + 32] |= (q[:, r] & 0x0F) << (4 * nib)
        qh[:, half * 32:half * 32 + 32] |= (q[:, r] >> 4) << (2 * (r % 4))
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)


_K_QUANTIZERS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k, QT.Q6_K: quantize_q6_k,
}


def quantize(w: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize a float32 matrix (rows, cols) into GGUF bytes (rows, bytes per row)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype in _K_QUANTIZERS:
        rows, cols = w.shape
        assert cols % QK_K == 0, f"{qtype.name} needs rows of a multiple of {QK_K}"
        blocks = _K_QUANTIZERS[qtype](w.reshape(-1, QK_K))
        assert blocks.shape[1] == GGML_QUANT_SIZES[qtype][1]
        return blocks.reshape(rows, -1)
    if qtype == QT.F32:
        return w
    if qtype == QT.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w, qtype)


def roundtrip(w: torch.Tensor, qtype: QT) -> torch.Tensor:
    """What a float32 tensor becomes after quantizing to `qtype` and dequantizing (gguf-py)."""
    if qtype == QT.F32 or w.dim() == 1:
        return w.clone()
    data = quantize(w.numpy(), qtype)
    if qtype == QT.F16:
        return torch.from_numpy(data.astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32)).reshape(w.shape)


def can_quantize(shape: tuple[int, ...], qtype: QT) -> bool:
    """Whether a tensor's rows fit the type's blocks (1-D tensors stay F32, as llama.cpp keeps norms)."""
    return len(shape) == 2 and shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def tensor_types(sd: dict[str, torch.Tensor], qtype: QT, *, fallback: QT = QT.F16) -> dict[str, QT]:
    """The type each tensor is written in: `qtype`, F32 for norms, `fallback` where rows don't fit."""
    out = {}
    for name, t in sd.items():
        if t.dim() == 1:
            out[name] = QT.F32
        elif can_quantize(tuple(t.shape), qtype):
            out[name] = qtype
        else:
            out[name] = fallback
    return out


def sentencepiece_vocab(model_file: Path) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and llama.cpp token types of a SentencePiece model (as convert_hf_to_gguf)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


def write_llama_gguf(
    path: Path,
    sd: dict[str, torch.Tensor],
    args: ModelArgs,
    types: dict[str, QT],
    *,
    spm_model: Path | None = None,
    chat_template: str | None = None,
    architecture: str = "llama",
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write Meta-named float32 weights (Meta RoPE layout, as llama.cpp stores them) as a GGUF."""
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if spm_model is not None:
        tokens, scores, ttypes = sentencepiece_vocab(spm_model)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(ttypes)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if extra is not None:
        extra(w)
    for name, t in sd.items():
        qtype = types[name]
        data = quantize(t.float().numpy(), qtype) if t.dim() == 2 else t.float().numpy()
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype if qtype not in (QT.F32, QT.F16)
                     else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def model_from_meta(sd: dict[str, torch.Tensor], args: ModelArgs, *,
                    max_seq_len: int = 64) -> Transformer:
    """A float32 Transformer holding Meta-named weights (the reference for loaded GGUFs)."""
    if "output.weight" not in sd:
        args = args.replace(tie_embeddings=True)
    raw = RawCheckpoint(args=args, layout="meta", path=Path("<memory>"), names=set(sd),
                        get=sd.__getitem__, where=lambda n: "<memory>")
    state = build_state_dict(raw, dtype=torch.float32, device=torch.device("cpu"))
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.eval().requires_grad_(False)
    model.setup_caches(1, max_seq_len)
    return model


@torch.inference_mode()
def full_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Logits (S, vocab) of one forward pass over `ids` from position 0."""
    model.reset_caches()
    return model(torch.tensor([ids]), torch.arange(len(ids)))[0]


@torch.inference_mode()
def greedy(model: Transformer, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """`n` greedy tokens with the KV cache (prefill, then one token at a time) and each step's logits."""
    model.reset_caches()
    pos = len(ids)
    logits = model(torch.tensor([ids]), torch.arange(pos), output_idx=torch.tensor([pos - 1]))[0, -1]
    out, steps = [], []
    for _ in range(n):
        steps.append(logits)
        nxt = int(logits.argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), torch.tensor([pos]), kv_len=pos + 1)[0, -1]
        pos += 1
    return out, steps


def k_quant_model() -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """A small random Llama whose every matrix row is a multiple of 256 (K-quant super-blocks).

    stories260K (dim 64, FFN 172) has no such row, so llama.cpp itself could not K-quantize it.
    """
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=512,
                     head_dim=64, rope_theta=10000.0, max_seq_len=128)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return sd, args
