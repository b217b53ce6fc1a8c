"""Decode speed of llamarun (eager, compiled) and llama.cpp on one GGUF, taking turns in one process.

compare.py runs each engine in a process of its own, one after the other: on a shared machine
whose speed changes from minute to minute (this project's AMD EPYC read memory at about 50 GB/s
in some minutes and 80 in others), two engines measured a minute apart are not comparable, nor a
decode and a memory read taken at another time. Here every round decodes --gen-tokens tokens
with each engine, back to back, and reads 1 GiB of memory (llamarun.memory_read's dot product
in huge pages, where llamarun's weights are); the table gives per engine the median tok/s and
weight GB/s, and the medians over rounds of its ratio to llama.cpp's decode and to the read of
the same round. Each decode starts after the same 8-token prompt (compare.py's), greedy.

    python benchmarks/decode_ab.py --models 1b --precisions bf16,q8_0,q4 [--rounds 7]
        [--gen-tokens 32] [--engines llamarun,llamarun-compiled,llama.cpp] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402 (benchmarks/compare.py: the files, prompts and byte counts)

ENGINES = ("llamarun", "llamarun-compiled", "llama.cpp")


def llamarun_decoder(path: Path, dtype: str, engines: list[str],
                     gen: int) -> tuple[dict[str, Callable[[], float]], int]:
    """({engine: decode() -> tok/s}, weight bytes per token) for llamarun's engines on a file
    (both on one loaded checkpoint)."""
    from llamarun.bench import weight_bytes
    from llamarun.engine import Engine
    from llamarun.loaders import load_checkpoint

    ck = load_checkpoint(path, device="cpu", dtype=dtype, quantize="auto",
                         max_seq_len=compare.TG_PROMPT + gen + 16)
    ids = compare.prompt_ids(ck.args.vocab_size, compare.TG_PROMPT)
    out: dict[str, Callable[[], float]] = {}
    per_token = 0
    for name in engines:
        if not name.startswith("llamarun"):
            continue
        engine = Engine(ck, compare._NoTokenizer(), None,  # type: ignore[arg-type]
                        compile=name == "llamarun-compiled")
        if name == "llamarun-compiled":
            engine.wait_compiled()
            if not engine.compiled_ready:
                raise RuntimeError("the decode step did not compile")
        per_token = weight_bytes(engine)[1]
        out[name] = compare.llamarun_decoder(engine, ids, gen)
    return out, per_token


def llama_cpp_decoder(path: Path, gen: int, threads: int) -> Callable[[], float]:
    """decode() -> tok/s of llama.cpp (llama-cpp-python) on the file, as compare.py times it."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=compare.TG_PROMPT + gen + 16,
                          n_batch=compare.TG_PROMPT, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    return compare.llama_cpp_decoder(llm, compare.prompt_ids(llm.n_vocab(), compare.TG_PROMPT),
                                     gen)


def memory_reader(nbytes: int = 2**30) -> Callable[[], float]:
    """read() -> GB/s of one float32 dot product over nbytes in huge pages (made once)."""
    from llamarun import hugepages

    arena = hugepages.Arena()
    n = nbytes // 8
    x = arena.empty((n,), torch.float32).fill_(1.0)
    y = arena.empty((n,), torch.float32).fill_(1.0)

    def read() -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.dot(x, y)
            times.append(time.perf_counter() - start)
        return nbytes / statistics.median(times) / 1e9

    read.buffers = (arena, x, y)  # type: ignore[attr-defined]
    return read


def run(model: str, prec: str, a: argparse.Namespace, read: Callable[[], float]) -> list[dict]:
    """The rows of one model x precision."""
    variant, dtype = compare.PRECISIONS[prec]
    path = compare.variant_files(model, (variant,))[variant]
    decoders, per_token = llamarun_decoder(path, dtype, a.engines, a.gen_tokens)
    bytes_per_token = {name: per_token for name in decoders}
    if "llama.cpp" in a.engines:
        decoders["llama.cpp"] = llama_cpp_decoder(path, a.gen_tokens, a.threads)
        bytes_per_token["llama.cpp"] = compare.gguf_facts(path)[1]
    for decode in decoders.values():  # warm-up (a compiled step runs slowly for a few seconds)
        start = time.perf_counter()
        while time.perf_counter() - start < 3:
            decode()
    tok_s: dict[str, list[float]] = {name: [] for name in decoders}
    reads: list[float] = []
    for _ in range(a.rounds):
        for name, decode in decoders.items():
            tok_s[name].append(decode())
        reads.append(read())
    rows = []
    for name, values in tok_s.items():
        gb_s = [t * bytes_per_token[name] / 1e9 for t in values]
        row = {"model": model, "precision": prec, "engine": name,
               "tg_tok_s": statistics.median(values), "gb_s": statistics.median(gb_s),
               "read_gb_s": statistics.median(reads),
               "gb_s_vs_read": statistics.median(g / r for g, r in zip(gb_s, reads))}
        if "llama.cpp" in tok_s:
            row["tg_vs_llama_cpp"] = statistics.median(
                t / c for t, c in zip(values, tok_s["llama.cpp"]))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=compare._csv(compare.MODELS), default=["smollm2"])
    ap.add_argument("--precisions", type=compare._csv(tuple(compare.PRECISIONS)),
                    default=list(compare.PRECISIONS))
    ap.add_argument("--engines", type=compare._csv(ENGINES), default=list(ENGINES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.rounds < 1 or a.gen_tokens < 1 or a.threads < 1:
        ap.error("--rounds, --gen-tokens and --threads must be at least 1")
    torch.set_num_threads(a.threads)
    from llamarun.device import device_name

    read = memory_reader()
    print(f"{device_name(torch.device('cpu'))}; torch {torch.__version__}; {a.threads} threads; "
          f"tg{a.gen_tokens} after {compare.TG_PROMPT} tokens; {a.rounds} rounds, each engine "
          f"then a 1 GiB read; medians (ratios: of each round's)")
    print(f"{'model':8} {'precision':9} {'engine':17} {'tg tok/s':>8} {'GB/s':>6} "
          f"{'read GB/s':>9} {'GB/s vs read':>12} {'tg vs llama.cpp':>15}")
    for model in a.models:
        only = compare._variants().ONLY_TYPES.get(model)
        for prec in a.precisions:
            if only is not None and compare.PRECISIONS[prec][0] not in only:
                continue
            for r in run(model, prec, a, read):
                ratio = r.get("tg_vs_llama_cpp")
                print(f"{model:8} {prec:9} {r['engine']:17} {r['tg_tok_s']:8.1f} "
                      f"{r['gb_s']:6.1f} {r['read_gb_s']:9.1f} {r['gb_s_vs_read']:12.2f} "
                      f"{'-' if ratio is None else format(ratio, '.2f'):>15}", flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
