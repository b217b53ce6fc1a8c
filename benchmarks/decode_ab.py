"""Decode speed of llamarun (eager, compiled) and llama.cpp on one GGUF, taking turns in one process.

compare.py runs each engine in a process of its own, one after the other: on a shared machine
whose speed changes from minute to minute (this project's AMD EPYC read memory at about 50 GB/s
in some minutes and 80 in others), two engines measured a minute apart are not comparable, nor a
decode and a memory read taken at another time. Here every round decodes --gen-tokens tokens
with each engine, back to back, and reads 1 GiB of memory (llamarun.memory_read's dot product
in huge pages, where llamarun's weights are); the table gives per engine the median tok/s and
weight GB/s, and the medians over rounds of its ratio to llama.cpp's decode and to the read of
the same round. Each decode starts after the same 8-token prompt (compare.py's; --prompt-tokens
for a longer context), greedy.

    python benchmarks/decode_ab.py --models 1b --precisions bf16,q8_0,q4 [--rounds 7]
        [--gen-tokens 32] [--prompt-tokens 8] [--engines llamarun,llamarun-compiled,llama.cpp]
        [--threads 2]
        [--baseline REV | --baseline-tree REV]

--baseline REV adds an engine "llamarun@REV": the eager decode of the same loaded model with
llamarun's C++ kernels built from REV's sources (loaded beside this tree's, without their
operator registrations, and swapped in for its turns), with a "vs baseline" column: llamarun's
eager decode over it, round by round. It compares kernel changes that keep the kernels'
functions, arguments and weight layouts (compare.py --baseline runs a whole other tree in
another process instead, minutes apart on a machine whose speed changes by the minute); builds
older than f91a69b lack the layer stacks' set_head and set_embedding, which this tree's model
calls: compare those with --baseline-tree.

--baseline-tree REV compares any change instead (Python too): "llamarun@REV" is the eager decode
of llamarun at REV (a git worktree, compare.baseline_tree) in a worker process that loads the
file once and decodes a round's tokens whenever this one asks, so the two still take turns round
by round (this tree's engines run here; the worker waits meanwhile).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402 (benchmarks/compare.py: the files, prompts and byte counts)

ENGINES = ("llamarun", "llamarun-compiled", "llama.cpp")


def baseline_kernels(rev: str) -> tuple[str, ModuleType]:
    """(short sha, extension) of llamarun's C++ kernels at git revision rev, built on first use
    into benchmarks/.cache/kernels-SHA under their own module name and without their
    TORCH_LIBRARY_IMPL blocks (this tree's extension registers the operators)."""
    from torch.utils import cpp_extension

    from llamarun import kernels

    repo = compare.REPO
    sha = compare.short_sha(rev)
    folder = repo / "benchmarks" / ".cache" / f"kernels-{sha}"
    folder.mkdir(parents=True, exist_ok=True)
    listed = subprocess.run(["git", "ls-tree", "--name-only", sha, "llamarun/kernels/"],
                            cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if name.endswith((".cpp", ".h")):
            text = without_registrations(subprocess.run(
                ["git", "show", f"{sha}:{name}"], cwd=repo, capture_output=True, text=True,
                check=True).stdout)
            target = folder / Path(name).name
            if not target.exists() or target.read_text() != text:  # (kept: no rebuild)
                target.write_text(text)
    sources = [str(folder / p.name) for p in kernels.SOURCES if (folder / p.name).exists()]
    ext = cpp_extension.load(name=f"llamarun_kernels_{sha}", sources=sources,
                             build_directory=str(folder), extra_cflags=["-O3", "-fopenmp"],
                             extra_ldflags=["-fopenmp"], verbose=False)
    return sha, ext


def without_registrations(source: str) -> str:
    """C++ source with each TORCH_LIBRARY_IMPL(...) { ... } block removed (braces matched)."""
    out, pos = [], 0
    for m in re.finditer(r"TORCH_LIBRARY_IMPL\s*\(", source):
        if m.start() < pos:
            continue
        depth, i = 0, source.index("{", m.end())
        while True:
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
            if depth == 0:
                break
        out.append(source[pos:m.start()])
        pos = i
    return "".join(out) + source[pos:]


def with_kernels(ext: ModuleType, decode: Callable[[], float], model: Any) -> Callable[[], float]:
    """decode() run with llamarun.kernels' extension swapped for ext (the eager path calls the
    extension through kernels._extension), then swapped back. The model's layer stacks are
    swapped too: each build reads only the stacks it made (a stack's C++ layout may differ
    between the builds, and pybind11 passes one build's object to the other's functions)."""
    from llamarun import kernels

    stacks: dict = {}  # type: ignore[type-arg]  # ext's stacks (model._parts_by_kind)

    def swapped() -> float:
        own, own_stacks = kernels._extension, model._parts_by_kind
        kernels._extension = lambda: ext  # type: ignore[assignment]
        model._parts_by_kind = stacks
        try:
            return decode()
        finally:
            kernels._extension = own  # type: ignore[assignment]
            model._parts_by_kind = own_stacks

    return swapped


def llamarun_decoder(path: Path, dtype: str, engines: list[str], gen: int,
                     baseline: tuple[str, ModuleType] | None = None,
                     prompt: int = compare.TG_PROMPT,
                     ) -> tuple[dict[str, Callable[[], float]], int]:
    """({engine: decode() -> tok/s}, weight bytes per token) for llamarun's engines on a file
    (all on one loaded checkpoint; "llamarun@SHA" with the baseline's kernels)."""
    from llamarun.bench import weight_bytes
    from llamarun.engine import Engine
    from llamarun.loaders import load_checkpoint

    ck = load_checkpoint(path, device="cpu", dtype=dtype, quantize="auto",
                         max_seq_len=prompt + gen + 16)
    ids = compare.prompt_ids(ck.args.vocab_size, prompt)
    out: dict[str, Callable[[], float]] = {}
    per_token = 0
    if baseline is not None:
        engine = Engine(ck, compare._NoTokenizer(), None, compile=False)  # type: ignore[arg-type]
        per_token = weight_bytes(engine)[1]
        out[f"llamarun@{baseline[0]}"] = with_kernels(
            baseline[1], compare.llamarun_decoder(engine, ids, gen), ck.model)
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


def tree_decoder(rev: str, path: Path, dtype: str, gen: int,
                 threads: int, prompt: int = compare.TG_PROMPT) -> Callable[[], float]:
    """decode() -> tok/s of llamarun's eager decode at git revision rev (compare.baseline_tree),
    from a worker process (decode_worker) that loads the file once; decode.process is the
    worker (closing its stdin ends it)."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--decode-worker",
                             str(path), dtype, str(gen), str(prompt)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=compare.tree_env(compare.baseline_tree(rev), threads))
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"llamarun at {rev} did not load {path.name}")

    def decode() -> float:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llamarun at {rev} stopped")
        return float(line)

    decode.process = proc  # type: ignore[attr-defined]
    return decode


def decode_worker(path: str, dtype: str, gen: int, prompt: int) -> None:
    """--decode-worker: load the file with the llamarun on sys.path (PYTHONPATH: a baseline tree),
    print "ready", then one decode's tok/s per line read from stdin."""
    decode = llamarun_decoder(Path(path), dtype, ["llamarun"], gen, prompt=prompt)[0]["llamarun"]
    print("ready", flush=True)
    for _ in sys.stdin:
        print(decode(), flush=True)


def llama_cpp_decoder(path: Path, gen: int, threads: int,
                      prompt: int = compare.TG_PROMPT) -> Callable[[], float]:
    """decode() -> tok/s of llama.cpp (llama-cpp-python) on the file, as compare.py times it."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt + gen + 16,
                          n_batch=min(prompt, 512), n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    return compare.llama_cpp_decoder(llm, compare.prompt_ids(llm.n_vocab(), prompt),
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
    decoders, per_token = llamarun_decoder(path, dtype, a.engines, a.gen_tokens, a.baseline_ext,
                                           a.prompt_tokens)
    if a.baseline_tree:
        decoders[f"llamarun@{compare.short_sha(a.baseline_tree)}"] = tree_decoder(
            a.baseline_tree, path, dtype, a.gen_tokens, a.threads, a.prompt_tokens)
    bytes_per_token = {name: per_token for name in decoders}
    if "llama.cpp" in a.engines:
        decoders["llama.cpp"] = llama_cpp_decoder(path, a.gen_tokens, a.threads, a.prompt_tokens)
        bytes_per_token["llama.cpp"] = compare.gguf_facts(path)[1]
    for decode in decoders.values():  # warm-up (a compiled step runs slowly for a few seconds)
        start = time.perf_counter()
        while time.perf_counter() - start < 3:
            decode()
    tok_s: dict[str, list[float]] = {name: [] for name in decoders}
    reads: list[float] = []
    try:
        for _ in range(a.rounds):
            for name, decode in decoders.items():
                tok_s[name].append(decode())
            reads.append(read())
    finally:
        for decode in decoders.values():
            worker = getattr(decode, "process", None)
            if worker is not None:
                worker.stdin.close()
                worker.wait(timeout=60)
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
        base = next((n for n in tok_s if n.startswith("llamarun@")), None)
        if base is not None and name == "llamarun":
            row["tg_vs_baseline"] = statistics.median(t / b for t, b in zip(values, tok_s[base]))
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
    ap.add_argument("--prompt-tokens", type=int, default=compare.TG_PROMPT,
                    help="the prompt before each decode (the context it attends)")
    ap.add_argument("--threads", type=int, default=2)
    base = ap.add_mutually_exclusive_group()
    base.add_argument("--baseline", default=None,
                      help="a git revision: also decode with llamarun's kernels built from it")
    base.add_argument("--baseline-tree", default=None,
                      help="a git revision: also decode with llamarun at it, in a worker process")
    ap.add_argument("--decode-worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.decode_worker:
        decode_worker(a.decode_worker[0], a.decode_worker[1], int(a.decode_worker[2]),
                      int(a.decode_worker[3]))
        return
    if a.rounds < 1 or a.gen_tokens < 1 or a.threads < 1 or a.prompt_tokens < 1:
        ap.error("--rounds, --gen-tokens, --prompt-tokens and --threads must be at least 1")
    torch.set_num_threads(a.threads)
    from llamarun.device import device_name

    a.baseline_ext = baseline_kernels(a.baseline) if a.baseline else None

    read = memory_reader()
    print(f"{device_name(torch.device('cpu'))}; torch {torch.__version__}; {a.threads} threads; "
          f"tg{a.gen_tokens} after {a.prompt_tokens} tokens; {a.rounds} rounds, each engine "
          f"then a 1 GiB read; medians (ratios: of each round's)")
    print(f"{'model':8} {'precision':9} {'engine':17} {'tg tok/s':>8} {'GB/s':>6} "
          f"{'read GB/s':>9} {'GB/s vs read':>12} {'tg vs llama.cpp':>15} {'vs baseline':>11}")
    for model in a.models:
        only = compare._variants().ONLY_TYPES.get(model)
        for prec in a.precisions:
            if only is not None and compare.PRECISIONS[prec][0] not in only:
                continue
            for r in run(model, prec, a, read):
                ratio, vs_base = r.get("tg_vs_llama_cpp"), r.get("tg_vs_baseline")
                print(f"{model:8} {prec:9} {r['engine']:17} {r['tg_tok_s']:8.1f} "
                      f"{r['gb_s']:6.1f} {r['read_gb_s']:9.1f} {r['gb_s_vs_read']:12.2f} "
                      f"{'-' if ratio is None else format(ratio, '.2f'):>15} "
                      f"{'-' if vs_base is None else format(vs_base, '.3f'):>11}", flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
