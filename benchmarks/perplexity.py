"""Perplexity of llamarun variants (dtype, quantization) and of llama.cpp on the same tokens.

The text is llamarun's default (the stdlib's pydoc topics), tokenized once with the model's
tokenizer and truncated to --max-tokens; every engine scores the same ids in the same windows
(llamarun.perplexity's sliding windows). llama.cpp runs when `llama-cpp-python` is installed and
the model is a GGUF: it is the reference a quantized or bfloat16 llamarun should stay close to.

    python benchmarks/perplexity.py                       # embedded SmolLM2-135M GGUF
    python benchmarks/perplexity.py --model X.gguf --dtypes float32,bfloat16 --quantize int8 \
        --max-tokens 4096 --ctx 512 [--stride 256] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llamarun.engine import Engine
from llamarun.perplexity import PerplexityResult, default_text, perplexity, plan_windows


def load_engine(path: Path, *, device: str, dtype: str, ctx: int, quantize: str | None) -> Engine:
    """llamarun.load with quantize= only when asked (older versions do not take it)."""
    import llamarun

    extra = {} if quantize is None else {"quantize": quantize}
    try:
        return llamarun.load(path, device=device, dtype=dtype, max_seq_len=ctx, **extra)
    except TypeError as e:
        if quantize is not None and "quantize" in str(e):
            raise SystemExit(f"--quantize {quantize}: this llamarun's load() has no quantize "
                             f"option ({e})") from None
        raise


def run_llamarun(engine: Engine, ids: list[int], *, ctx: int, stride: int) -> PerplexityResult:
    """Perplexity after a one-window warm-up (so tok/s leaves out first-call overheads)."""
    perplexity(engine, ids[:ctx], ctx=ctx, stride=ctx)
    return perplexity(engine, ids, ctx=ctx, stride=stride)


def run_llama_cpp(path: Path, ids: list[int], *, ctx: int, stride: int,
                  threads: int) -> PerplexityResult | None:
    """The same windows through llama.cpp's own logits, or None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=ctx, logits_all=True, verbose=False, n_threads=threads)
    windows = plan_windows(len(ids), ctx=ctx, stride=stride)
    nll_sum, n_scored, processed = 0.0, 0, 0
    start = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(ids[w.begin:w.end])
        length = w.end - w.begin
        logits = torch.from_numpy(llm.scores[:length]).double()  # (length, vocab)
        logp = torch.log_softmax(logits[w.first - w.begin - 1:length - 1], dim=-1)
        targets = torch.tensor(ids[w.first:w.end])
        nll_sum -= float(logp.gather(1, targets[:, None]).sum())
        n_scored += w.end - w.first
        processed += length
    seconds = time.perf_counter() - start
    nll = nll_sum / n_scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, n_tokens_scored=n_scored,
                            n_windows=len(windows), ctx=ctx, stride=stride, seconds=seconds,
                            tokens_per_s=processed / seconds)


def _pct(value: float, ref: float | None) -> str:
    return "-" if ref is None else f"{(value / ref - 1) * 100:+.2f}%"


def main() -> None:
    """Parse the flags, score every variant, print the table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: SmolLM2 GGUF)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of llamarun dtypes")
    ap.add_argument("--quantize", default=None,
                    help="comma list of llamarun quantizations, each run in every dtype")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=None, help="default: ctx / 2")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = a.model
    if path is None:
        from llamarun.default_model import default_model_hint, default_model_path

        path = default_model_path()
        if path is None:
            raise SystemExit(f"no --model and the default model is not installed "
                             f"({default_model_hint()})")
    stride = a.stride or max(a.ctx // 2, 1)
    quants: list[str | None] = [None]
    if a.quantize:
        quants += [q for q in a.quantize.split(",") if q]

    rows: list[tuple[str, PerplexityResult]] = []
    ids: list[int] = []
    for dtype in [d for d in a.dtypes.split(",") if d]:
        for q in quants:
            engine = load_engine(path, device=a.device, dtype=dtype, ctx=a.ctx, quantize=q)
            if not ids:
                tok = engine.tokenizer
                ids = tok.encode(default_text(), bos=tok.add_bos)[:a.max_tokens]
            name = f"{dtype} (load default)" if q is None else f"{dtype} quantize={q}"
            rows.append((f"llamarun {name}", run_llamarun(engine, ids, ctx=a.ctx, stride=stride)))
            del engine
    notes = []
    ref = None
    if a.no_llama_cpp:
        notes.append("llama.cpp skipped (--no-llama-cpp)")
    elif path.suffix != ".gguf":
        notes.append("llama.cpp skipped: the model is not a GGUF file")
    else:
        ref = run_llama_cpp(path, ids, ctx=a.ctx, stride=stride, threads=a.threads)
        if ref is None:
            notes.append("llama.cpp skipped: llama-cpp-python is not installed "
                         "(pip install llama-cpp-python)")
        else:
            rows.append(("llama.cpp (GGUF as is)", ref))

    first = rows[0][1].perplexity
    ref_ppl = ref.perplexity if ref is not None else None
    if a.json:
        print(json.dumps({
            "model": str(path), "torch": torch.__version__, "threads": a.threads,
            "tokens": len(ids), "ctx": a.ctx, "stride": stride, "notes": notes,
            "rows": [{"variant": name, **vars(r),
                      "vs_first_pct": (r.perplexity / first - 1) * 100,
                      "vs_llama_cpp_pct": None if ref_ppl is None
                      else (r.perplexity / ref_ppl - 1) * 100} for name, r in rows],
        }))
        return
    print(f"model: {path}\ntorch {torch.__version__}, {a.threads} threads, {len(ids)} tokens of "
          f"the default text, ctx {a.ctx}, stride {stride}, {rows[0][1].n_windows} windows")
    for note in notes:
        print(note)
    print(f"\n{'variant':36} {'ppl':>10} {'vs first':>9} {'vs llama.cpp':>12} {'tok/s':>9}")
    for name, r in rows:
        print(f"{name:36} {r.perplexity:10.4f} {_pct(r.perplexity, first):>9} "
              f"{_pct(r.perplexity, ref_ppl):>12} {r.tokens_per_s:9.1f}")


if __name__ == "__main__":
    main()
