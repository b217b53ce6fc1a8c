"""Short CUDA decode bench: eager, compiled (CUDA graphs), int8 and int4, on two model shapes.

Random weights in the shapes that matter (SmolLM2-135M, Llama-3.2-1B), written once as bfloat16
HF folders, so the bench needs no download; the tokenizer is stories260K's (ids only matter).
Prints the device's plain memory read (llamarun.memory_read); on CUDA, the GB/s of the 1B
shape's weight products alone (and their share of the read), 1 and 4 rows, per kernel: bfloat16
(F.linear), int8 through llamarun's Triton kernel and dequantized first (the path it replaced),
int4 through `_weight_int4pack_mm` and through llamarun's Triton kernel for the plain layout
(GPUs below compute capability 8.0 use it); then a table of decode tok/s and GB/s per variant.
Called by benchmarks/gpu_check.sh; runs on CPU too (slowly, decode table only) for a dry run.

    python benchmarks/gpu_bench.py [--device cuda] [--shapes smollm2,1b] [--gen-tokens 64]
        [--variants eager,int8] [--no-products]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llamarun import memory_read
from llamarun.bench import run_bench
from llamarun.config import ModelArgs
from llamarun.device import synchronize
from llamarun.engine import Engine
from llamarun.loaders import load_checkpoint
from llamarun.loaders.fuse import expected_shapes
from llamarun.tokenizer import load_chat_format, load_tokenizer

SHAPES = {
    "smollm2": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                         hidden_dim=1536, head_dim=64, rope_theta=100000.0, max_seq_len=2048,
                         tie_embeddings=True),
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                    hidden_dim=8192, head_dim=64, rope_theta=500000.0, max_seq_len=2048,
                    tie_embeddings=True),
}
_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def write_random_hf(folder: Path, args: ModelArgs) -> Path:
    """A random bfloat16 HF folder of this shape (q/k layout does not matter for speed)."""
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in expected_shapes(args).items():
        if name == "output.weight":
            continue  # tied
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            hf = f"model.layers.{i}.{_HF[rest]}"
        else:
            hf = _HF[name]
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        sd[hf] = t.to(torch.bfloat16)
    save_file(sd, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
              "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size,
              "head_dim": args.head_dim, "rope_theta": args.rope_theta, "rms_norm_eps": 1e-5,
              "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": True,
              "hidden_act": "silu", "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# (name, N, K) of the 1B shape's distinct products and its output head
PRODUCTS = [("wqkv", 3072, 2048), ("wo", 2048, 2048), ("w13", 16384, 2048), ("w2", 2048, 8192),
            ("output", 128256, 2048)]


def _seconds(fn, device: torch.device, min_s: float = 0.2) -> float:
    """Median seconds of one call of fn, in batches of calls lasting about min_s / 5."""
    fn()
    synchronize(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s / 5:
        fn()
        n += 1
    synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / n)
    return sorted(times)[2]


def bench_products(device: torch.device, read_gb_s: float) -> None:
    """GB/s of weights per product kernel (see the module's docstring), and over the read."""
    from llamarun.quant import Int4Linear, Int8Linear, int4_layout, quantize_int4, quantize_int8
    from llamarun.quant.cuda_kernels import int8_mm

    print(f"{'matrix':7} {'N x K':>12} {'rows':>4} {'kernel':22} {'GB/s':>7} {'vs read':>7}")
    g = torch.Generator().manual_seed(0)
    for name, n, k in PRODUCTS:
        w = torch.randn(n, k, generator=g) * 0.02
        wb = w.to(device, torch.bfloat16)
        q8 = quantize_int8(w)
        i8 = Int8Linear(k, n, kernel="cuda").to(device)
        i8.load_state_dict(Int8Linear.state(q8, device=device, dtype=torch.bfloat16,
                                            kernel="cuda"), assign=True)
        q4 = quantize_int4(w, 32)  # (on the host: the 1B head's takes seconds, done once)
        layout = int4_layout(device, k, n, 32)
        i4 = Int4Linear(k, n, group_size=32, layout=layout).to(device)
        i4.load_state_dict(Int4Linear.state(q4, device=device, dtype=torch.bfloat16,
                                            layout=layout), assign=True)
        plain = Int4Linear(k, n, group_size=32, layout="plain", kernel="cuda").to(device)
        plain.load_state_dict(Int4Linear.state(q4, device=device, dtype=torch.bfloat16,
                                               layout="plain"), assign=True)
        del w, q4
        for rows in (1, 4):
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            runs = [("bf16 F.linear", n * k * 2, lambda: F.linear(x, wb)),
                    ("int8 triton", n * k + n * 2, lambda: int8_mm(x, i8.weight, i8.scales)),
                    ("int8 dequantized", n * k + n * 2,
                     lambda: F.linear(x, i8.weight.to(x.dtype) * i8.scales[:, None])),
                    (f"int4 {layout} g32", n * k // 2 + n * k // 32 * 4, lambda: i4(x)),
                    ("int4 plain triton g32", n * k // 2 + n * k // 32 * 4, lambda: plain(x))]
            for label, nbytes, fn in runs:
                with torch.inference_mode():
                    gb_s = nbytes / _seconds(fn, device) / 1e9
                print(f"{name:7} {f'{n}x{k}':>12} {rows:4} {label:22} {gb_s:7.0f} "
                      f"{gb_s / read_gb_s:7.2f}", flush=True)
        del wb, i8, i4, plain
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="smollm2,1b")
    ap.add_argument("--tokenizer", type=Path, required=True,
                    help="a tokenizer folder (stories260K's)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--variants", default="eager,compiled,int8,int8 compiled,int4,int4 compiled",
                    help="comma-separated, of: eager, compiled, int8, int8 compiled, int4, "
                         "int4 compiled")
    ap.add_argument("--no-products", action="store_true",
                    help="skip the per-kernel product table (CUDA only)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llamarun-gpu")
    a = ap.parse_args()
    tok = load_tokenizer(a.tokenizer)
    chat = load_chat_format(tok, None)
    variants = [("eager", "none", False), ("compiled", "none", True),
                ("int8", "int8", False), ("int8 compiled", "int8", True),
                ("int4", "int4", False), ("int4 compiled", "int4", True)]
    chosen = [v.strip() for v in a.variants.split(",")]
    unknown = set(chosen) - {label for label, _, _ in variants}
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    variants = [v for v in variants if v[0] in chosen]
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    device = torch.device(a.device)
    read = memory_read.measure(device)
    print(f"device {name}, torch {torch.__version__}, pp{a.prompt_tokens} tg{a.gen_tokens}, "
          f"best of {a.reps}; memory read {read.gb_s:.0f} GB/s ({read.form})")
    if device.type == "cuda" and not a.no_products:  # first: seconds, where the decode takes minutes
        bench_products(device, read.gb_s)
    print(f"\n{'shape':8} {'variant':14} {'dtype':9} {'pp tok/s':>9} {'tg tok/s':>9} {'GB/s':>7} "
          f"{'vs read':>7} {'warmup s':>9} {'peak MiB':>9}")
    for shape in a.shapes.split(","):
        folder = write_random_hf(a.workdir / shape, SHAPES[shape])
        for label, quantize, compiled in variants:
            try:
                start = time.perf_counter()
                ck = load_checkpoint(folder, device=a.device, quantize=quantize,
                                     max_seq_len=a.prompt_tokens + a.gen_tokens + 16)
                engine = Engine(ck, tok, chat, compile=compiled,
                                load_s=time.perf_counter() - start)
                r = run_bench(engine, prompt_tokens=[a.prompt_tokens], gen_tokens=a.gen_tokens,
                              repetitions=a.reps)
                peak = (r.peak_device_bytes or r.peak_rss_bytes) / 2**20
                print(f"{shape:8} {label:14} {r.dtype:9} {max(r.prefill[0].tok_s.values):9.0f} "
                      f"{max(r.decode.tok_s.values):9.1f} {r.decode.bandwidth_gb_s:7.0f} "
                      f"{r.decode.bandwidth_gb_s / read.gb_s:7.2f} "
                      f"{r.warmup_s:9.1f} {peak:9.0f}", flush=True)
            except Exception as e:  # one failing variant must not hide the others
                print(f"{shape:8} {label:14} error: {type(e).__name__}: {str(e)[:160]}", flush=True)
            finally:
                torch._dynamo.reset()
                engine = ck = None  # noqa: F841 (free the GPU memory before the next variant)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
