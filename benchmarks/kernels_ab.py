"""PyTorch's CPU kernels against llamarun's on a whole model, in one process.

Loads the model twice: once with LLAMARUN_KERNELS=0 (PyTorch's weight-only kernels and their
layouts) and once with llamarun's kernels (on AVX2-only CPUs: the 4-bit layout and the AVX2
int8/int4 kernels), then alternates greedy generations on the two (a 512-token prompt, a
different one each repetition so nothing is reused, then --tokens tokens), so a busy period of a
shared machine hits both alike. Prints median prefill and decode tok/s and whether the texts match.

    python benchmarks/kernels_ab.py [--model X.gguf] [--quantize auto|int8|int4] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics

from llamarun.default_model import default_model_path
from llamarun.engine import Engine
from llamarun.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the installed SmolLM2 Q4_1")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--compile", action="store_true", help="the compiled decode step")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    path = args.model or default_model_path()
    engines = {}
    for k in ("0", "1"):  # the weights' layout is chosen at load
        os.environ["LLAMARUN_KERNELS"] = k
        engines[k] = Engine.load(path, device="cpu", quantize=args.quantize, max_seq_len=1024,
                                 compile=args.compile)
        if args.compile:
            engines[k].warmup()
            engines[k].wait_compiled()
    prefill: dict[str, list[float]] = {k: [] for k in engines}
    decode: dict[str, list[float]] = {k: [] for k in engines}
    texts: dict[str, str] = {}
    for rep in range(args.reps + 1):  # the first is a warm-up
        for k, engine in engines.items():
            os.environ["LLAMARUN_KERNELS"] = k
            ids = engine.tokenizer.encode(f"Story {rep}. " + "Once upon a time, " * 100,
                                          bos=True)[:512]
            gen = engine.complete(ids, sampling=SamplingParams.greedy(),
                                  max_new_tokens=args.tokens)
            texts[k] = "".join(c.text for c in gen)
            r = gen.result
            if rep:
                prefill[k].append(r.prefill_tokens / r.prefill_s)
                decode[k].append((r.completion_tokens - 1) / r.decode_s)
    for k, name in (("0", "PyTorch's kernels"), ("1", "llamarun's kernels")):
        print(f"{name:18}: prefill {statistics.median(prefill[k]):7.1f} tok/s, "
              f"decode {statistics.median(decode[k]):6.1f} tok/s")
    print("same text:", texts["0"] == texts["1"])


if __name__ == "__main__":
    main()
