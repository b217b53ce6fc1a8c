"""llamarun against llama.cpp and transformers at matched precisions, on the same GGUF files.

For each model and precision (F32 <-> float32, BF16 <-> bfloat16, Q8_0 <-> int8, Q4_0 <-> int4)
it writes the GGUF variant (benchmarks/variants.py, cached in benchmarks/.cache/), then runs
each engine on it in a fresh worker process (so peak memory is per engine) and prints:
pp (prefill of N prompt tokens, tok/s), tg (decode of M tokens after an 8-token prompt, tok/s),
TTFT (prefill of the N-token prompt + the first greedy sample, s), peak RSS, achieved GB/s
(weight bytes read per token x tg tok/s) and each engine's pp and tg relative to llama.cpp (and to
transformers where it ran) in the same run. Timings are medians over --reps after a warm-up
(at least one run and 1 s; 3 s after a compile). Around every engine's turn the machine's plain
memory read rate is measured with the same threads (a worker reading 1 GiB, the fastest of two
streaming PyTorch reads in ordinary and in huge pages, where llamarun keeps its weights), and
each row's decode GB/s is divided by the mean of the reads just before and just after its turn
("GB/s vs read": a model larger than the caches cannot decode faster than its weights stream; a
small one partly reads from cache and can exceed 1). A shared machine's read rate can change
between minutes (one AMD EPYC here flipped between about 50 and 80 GB/s), so a read taken once
per run is no denominator for a turn minutes later; the range of the reads is printed above the
tables, and each row's read beside it (--read-once: one read after the turns, as before).

Models: "smollm2" (the embedded SmolLM2-135M-Instruct, re-encoded from its Q4_1 GGUF), "1b" (a
random Llama-3.2-1B-shaped model; opt-in: about 10 GB of GGUF files and a long run) and "8b" (a
random Llama-3.1-8B-shaped model, Q4_0 only: a 4.7 GB file; opt-in). "RSS / file+KV" is the
peak resident memory over the GGUF file's size plus the engine's KV cache.
Engines: llamarun (eager), llamarun-compiled (torch.compile'd decode step; compile time reported
apart), transformers (eager; F32/BF16 of smollm2 only, loading the F32 GGUF), llama.cpp
(llama-cpp-python).

    python benchmarks/compare.py                                   # smollm2, every precision
    python benchmarks/compare.py --models smollm2,1b --precisions q4,bf16 --prompt-tokens 512 \
        --gen-tokens 128 --reps 3 --threads 2 --engines llamarun,llama.cpp [--json]
    python benchmarks/compare.py --baseline ca7d8ff    # also llamarun at that commit, same run
    python benchmarks/compare.py --models 8b --precisions q4 --prompt-tokens 64 --gen-tokens 32
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENGINES = ("llamarun", "llamarun-compiled", "transformers", "llama.cpp")
PRECISIONS = {  # name -> (GGUF variant, llamarun dtype)
    "f32": ("F32", "float32"),
    "bf16": ("BF16", "bfloat16"),
    "q8_0": ("Q8_0", "auto"),  # Q8_0 is kept as int8 (per-row scales)
    "q4": ("Q4_0", "auto"),  # Q4_0 is kept as int4 (groups of 32)
}
MODELS = ("smollm2", "1b", "8b")  # variants.MAKERS
TG_PROMPT = 8  # tokens prefilled before timing decode
RESULT = "@@result "  # prefix of the worker's one JSON line on stdout
REPO = Path(__file__).resolve().parent.parent  # the llamarun checkout these scripts belong to


# ---- worker: one engine on one file, in its own process ----

def prompt_ids(vocab: int, n: int) -> list[int]:
    """The same seeded random prompt for every engine."""
    rng = random.Random(0)
    return [rng.randrange(100, min(vocab, 30000)) for _ in range(n)]


def medians(fn: Callable[[], tuple[float, ...]], reps: int, *,
            warmup_s: float = 1.0) -> tuple[float, ...]:
    """Per-field medians of fn()'s measurements over reps runs, after warming up.

    The warm-up runs fn at least once and for at least warmup_s seconds: right after a
    torch.compile, steps run several times slower for a few seconds.
    """
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < warmup_s:
        fn()
    runs = [fn() for _ in range(reps)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))


def _format_label(fmt: Any, dtype: str) -> str:
    """'float32', 'int8' or 'int4 g32' for a llamarun WeightFormat."""
    if fmt.kind == "dense":
        return dtype
    return f"int4 g{fmt.group_size}" if fmt.kind == "int4" else fmt.kind


def llamarun_storage(ck: Any) -> str:
    """How a loaded checkpoint stores its layer matrices (and embedding, when different)."""
    dtype = str(ck.dtype).removeprefix("torch.")
    layers = [_format_label(f, dtype) for n, f in ck.formats.items() if n.startswith("layers.")]
    main = max(set(layers), key=layers.count)
    emb = _format_label(ck.formats["tok_embeddings.weight"], dtype)
    label = main if emb == main else f"{main}, emb {emb}"
    return label if main == dtype else f"{label}; {dtype}"


def llamarun_decoder(engine: Any, ids: list[int], tg: int) -> Callable[[], float]:
    """decode() -> tok/s of tg greedy tokens after the prompt ids (its prefill and first token
    not timed), by a llamarun Engine."""
    from llamarun.sampling import SamplingParams

    greedy = SamplingParams.greedy()

    def decode() -> float:
        events = engine.token_events(ids, max_new_tokens=tg + 1, sampling=greedy, reuse=False)
        next(events)  # prefill and the first token are not decode
        start = time.perf_counter()
        n = sum(1 for _ in events)
        return n / (time.perf_counter() - start)

    return decode


def llama_cpp_greedy(llm: Any) -> Callable[[], int]:
    """greedy() -> the argmax of a llama_cpp.Llama's last logits."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()

    def greedy() -> int:
        # Llama.scores is not updated unless logits_all=True: read the last logits directly.
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(vocab,)).argmax())

    return greedy


def llama_cpp_decoder(llm: Any, ids: list[int], tg: int) -> Callable[[], float]:
    """decode() -> tok/s of tg greedy tokens after the prompt ids, by a llama_cpp.Llama."""
    greedy = llama_cpp_greedy(llm)

    def decode() -> float:
        llm.reset()
        llm.eval(ids)
        start = time.perf_counter()
        for _ in range(tg):
            llm.eval([greedy()])
        return tg / (time.perf_counter() - start)

    return decode


def run_llamarun(path: Path, dtype: str, pp: int, tg: int, reps: int, compiled: bool) -> dict:
    """pp/tg/TTFT of llamarun on a GGUF (compiled: the decode step through torch.compile)."""
    import torch

    from llamarun.bench import weight_bytes
    from llamarun.engine import Engine
    from llamarun.loaders import load_checkpoint
    from llamarun.sampling import SamplingParams

    start = time.perf_counter()
    ck = load_checkpoint(path, device="cpu", dtype=dtype, quantize="auto",
                         max_seq_len=max(pp, TG_PROMPT) + tg + 16)
    load_s = time.perf_counter() - start
    # The benchmark feeds token ids: no tokenizer or chat format is needed.
    engine = Engine(ck, _NoTokenizer(), None, compile=compiled)  # type: ignore[arg-type]
    compile_s = None
    if compiled:
        start = time.perf_counter()
        engine.wait_compiled()
        compile_s = time.perf_counter() - start
        if not engine.compiled_ready:
            raise RuntimeError("the decode step did not compile")
    greedy = SamplingParams.greedy()
    ids = prompt_ids(ck.args.vocab_size, max(pp, TG_PROMPT))

    def first_token() -> tuple[float, float]:
        start = time.perf_counter()
        for _ in engine.token_events(ids[:pp], max_new_tokens=1, sampling=greedy, reuse=False):
            pass  # the scheduler's prefill and the first token's id on the host
        ttft = time.perf_counter() - start
        return pp / ttft, ttft

    decode = llamarun_decoder(engine, ids[:TG_PROMPT], tg)
    warmup_s = 3.0 if compiled else 1.0
    pp_tok_s, ttft = medians(first_token, reps, warmup_s=warmup_s)
    (tg_tok_s,) = medians(lambda: (decode(),), reps, warmup_s=warmup_s)
    kv = sum(b.nbytes for name, b in ck.model.named_buffers()
             if name.endswith(("k_cache", "v_cache")))
    return {"pp_tok_s": pp_tok_s, "tg_tok_s": tg_tok_s, "ttft_s": ttft, "kv_bytes": kv,
            "bytes_per_token": weight_bytes(engine)[1], "storage": llamarun_storage(ck),
            "dtype": str(ck.dtype).removeprefix("torch."), "load_s": load_s,
            "compile_s": compile_s}


class _NoTokenizer:
    """Stands in for a tokenizer where Engine might look (warmup() reads bos_id)."""

    bos_id = None
    add_bos = False
    stop_ids: frozenset[int] = frozenset()


def run_transformers(path: Path, dtype: str, pp: int, tg: int, reps: int) -> dict:
    """pp/tg/TTFT of Hugging Face transformers (eager, DynamicCache) loading the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - start
    ids = prompt_ids(model.config.vocab_size, max(pp, TG_PROMPT))
    pp_ids = torch.tensor([ids[:pp]])

    @torch.inference_mode()
    def first_token() -> tuple[float, float]:
        start = time.perf_counter()
        logits = model(pp_ids, logits_to_keep=1).logits
        done = time.perf_counter()
        int(logits[0, -1].argmax())
        return pp / (done - start), time.perf_counter() - start

    @torch.inference_mode()
    def decode() -> tuple[float]:
        out = model(torch.tensor([ids[:TG_PROMPT]]), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        past = out.past_key_values
        start = time.perf_counter()
        for _ in range(tg):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            tok.item()
        return (tg / (time.perf_counter() - start),)

    pp_tok_s, ttft = medians(first_token, reps)
    (tg_tok_s,) = medians(decode, reps)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # a tied embedding once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    if not model.config.tie_word_embeddings:  # the lookup reads one row
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return {"pp_tok_s": pp_tok_s, "tg_tok_s": tg_tok_s, "ttft_s": ttft,
            "bytes_per_token": total, "storage": dtype, "dtype": dtype, "load_s": load_s}


def run_llama_cpp(path: Path, pp: int, tg: int, reps: int, threads: int) -> dict:
    """pp/tg/TTFT of llama.cpp (llama-cpp-python, default context settings) on the GGUF."""
    import llama_cpp

    start = time.perf_counter()
    n = max(pp, TG_PROMPT)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n + tg + 16, n_batch=n, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    ids = prompt_ids(llm.n_vocab(), n)
    greedy = llama_cpp_greedy(llm)

    def first_token() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:pp])
        done = time.perf_counter()
        greedy()
        return pp / (done - start), time.perf_counter() - start

    decode = llama_cpp_decoder(llm, ids[:TG_PROMPT], tg)
    pp_tok_s, ttft = medians(first_token, reps)
    (tg_tok_s,) = medians(lambda: (decode(),), reps)
    return {"pp_tok_s": pp_tok_s, "tg_tok_s": tg_tok_s, "ttft_s": ttft, "load_s": load_s}


def run_memory_read(reps: int) -> dict:
    """GB/s of a plain read of 1 GiB from memory (`llamarun.memory_read`: the best of a
    float32 dot product and a sum, in ordinary and in huge pages, where llamarun's weights are:
    the ratios compare against the faster)."""
    from llamarun import memory_read

    read = memory_read.measure("cpu", reps=max(reps, 5))
    return {"read_gb_s": read.gb_s, "read_form": read.form, "read_plain_gb_s": read.plain_gb_s,
            "read_bytes": read.nbytes}


def run_worker(a: argparse.Namespace) -> dict:
    """Measure one engine on one file in this process; add its peak RSS."""
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.worker == "memory-read":
        import torch

        torch.set_num_threads(a.threads)
        return run_memory_read(a.reps)
    path = Path(a.file)
    if a.worker == "llama.cpp":
        out = run_llama_cpp(path, a.prompt_tokens, a.gen_tokens, a.reps, a.threads)
    else:
        import torch

        torch.set_num_threads(a.threads)
        if a.worker == "transformers":
            out = run_transformers(path, a.dtype, a.prompt_tokens, a.gen_tokens, a.reps)
        else:
            out = run_llamarun(path, a.dtype, a.prompt_tokens, a.gen_tokens, a.reps,
                               compiled=a.worker == "llamarun-compiled")
    from llamarun.bench import peak_rss_bytes

    return {**out, "peak_rss_bytes": peak_rss_bytes()}


# ---- driver: variants, one worker per engine x variant, ratios, output ----

def gguf_facts(path: Path) -> tuple[str, int]:
    """(storage label, weight bytes read per token) of a GGUF file as llama.cpp runs it.

    Every tensor is read per token except an untied embedding (one row of it).
    """
    from llamarun.loaders.gguf import read_gguf_file

    tensors = read_gguf_file(path, tensors=False).tensors
    total = sum(t.nbytes for t in tensors.values())
    emb = tensors["token_embd.weight"]
    if "output.weight" in tensors:
        total -= emb.nbytes - emb.nbytes // emb.shape[0]
    types = [t.type_name for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    main = max(set(types), key=types.count)
    label = main if emb.type_name == main else f"{main}, emb {emb.type_name}"
    return label, total


def short_sha(rev: str) -> str:
    """The short commit id of git revision rev in this repository."""
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()


def baseline_tree(rev: str) -> Path:
    """A git worktree of llamarun at `rev` (benchmarks/.cache/baseline-SHA), made on first use."""
    sha = short_sha(rev)
    tree = REPO / "benchmarks" / ".cache" / f"baseline-{sha}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=REPO,
                       check=True, capture_output=True)
    return tree


def tree_env(tree: Path, threads: int) -> dict[str, str]:
    """The environment of a process running llamarun from a baseline_tree: its sources first on
    the path, and its own kernels' build folder (~/.cache/llamarun/kernels is per torch version,
    not per source: else HEAD's and the baseline's turns rebuild the extension in turn, 45 s
    each)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree),
            "HOME": str(tree.parent / f"{tree.name}-home")}


def run_one(engine: str, path: Path | None, dtype: str, a: argparse.Namespace) -> dict:
    """Run a worker process for one engine on one file; an error dict if it fails. An engine
    named ENGINE@REV runs that engine from llamarun at git revision REV (--baseline);
    "memory-read" (no file) measures the memory read rate."""
    script = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    name, _, rev = engine.partition("@")
    if rev:
        tree = baseline_tree(rev)
        script = tree / "benchmarks" / "compare.py"
        env = tree_env(tree, a.threads)
    cmd = [sys.executable, str(script), "--worker", name, "--file", str(path or ""),
           "--dtype", dtype, "--prompt-tokens", str(a.prompt_tokens),
           "--gen-tokens", str(a.gen_tokens), "--reps", str(a.reps), "--threads", str(a.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line.removeprefix(RESULT))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return {"error": (lines[-1] if lines else f"exit status {proc.returncode}")[:200]}


def _variants() -> Any:
    """benchmarks/variants.py (imported on first use: the workers do not need it)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import variants

    return variants


def variant_files(model: str, types: tuple[str, ...]) -> dict[str, Path]:
    """GGUF type -> file for a model, written on first use."""
    return _variants().MAKERS[model](types=types)


def add_ratios(rows: list[dict]) -> None:
    """Each row's pp and tg over llama.cpp's and transformers' for the same model and precision."""
    for peer, key in (("llama.cpp", "llama_cpp"), ("transformers", "transformers")):
        base = {(r["model"], r["precision"]): r for r in rows
                if r["engine"] == peer and "error" not in r}
        for r in rows:
            ref = base.get((r["model"], r["precision"]))
            if ref is None or "error" in r:
                continue
            for m in ("pp", "tg"):
                r[f"{m}_vs_{key}"] = r[f"{m}_tok_s"] / ref[f"{m}_tok_s"]


def engine_input(engine: str, model: str, prec: str,
                 files: dict[str, Path]) -> tuple[Path, str] | None:
    """The file and dtype an engine runs for a precision (None: the engine sits this one out)."""
    variant, dtype = PRECISIONS[prec]
    if not engine.startswith("transformers"):
        return files[variant], dtype
    if model != "smollm2" or prec not in ("f32", "bf16"):
        return None
    # Its GGUF loader dequantizes whatever it reads: the F32 file cast to dtype is the same.
    return files["F32"], "float32" if prec == "f32" else "bfloat16"


def memory_read_gb_s(a: argparse.Namespace) -> float | None:
    """One plain memory read in a worker (None if it failed)."""
    return run_one("memory-read", None, "-", a).get("read_gb_s")


def benchmark(a: argparse.Namespace, engines: list[str]) -> list[dict]:
    """Every row: model x precision x engine (each with the memory read around its turn, unless
    --read-once)."""
    rows: list[dict] = []
    read = None if a.read_once else memory_read_gb_s(a)
    for model in a.models:
        only = _variants().ONLY_TYPES.get(model)
        precisions = [p for p in a.precisions if only is None or PRECISIONS[p][0] in only]
        if not precisions:
            print(f"{model}: written in {', '.join(only or ())} only: skipped", file=sys.stderr)
            continue
        types = {PRECISIONS[p][0] for p in precisions}
        if "transformers" in engines and model == "smollm2" and {"f32", "bf16"} & set(a.precisions):
            types.add("F32")
        files = variant_files(model, tuple(sorted(types)))
        for prec in precisions:
            for engine in engines:
                job = engine_input(engine, model, prec, files)
                if job is None:
                    continue
                path, dtype = job
                print(f"{model} {prec} {engine} ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                row = {"model": model, "precision": prec, "engine": engine, "file": str(path),
                       **run_one(engine, path, dtype, a)}
                if "error" in row:
                    print(f"  error: {row['error']}", file=sys.stderr, flush=True)
                    rows.append(row)
                    continue
                if engine == "llama.cpp":
                    row["storage"], row["bytes_per_token"] = gguf_facts(path)
                row["gb_s"] = row["bytes_per_token"] * row["tg_tok_s"] / 1e9
                row["peak_rss_mib"] = row["peak_rss_bytes"] / 2**20
                if "kv_bytes" in row:
                    row["rss_vs_file_kv"] = row["peak_rss_bytes"] / (path.stat().st_size
                                                                     + row["kv_bytes"])
                print(f"  pp {row['pp_tok_s']:.1f} tok/s, tg {row['tg_tok_s']:.1f} tok/s "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
                if not a.read_once:
                    before, read = read, memory_read_gb_s(a)
                    if before and read:
                        row["read_gb_s"] = (before + read) / 2
                        row["gb_s_vs_read"] = row["gb_s"] / row["read_gb_s"]
                        print(f"  memory read {before:.1f} -> {read:.1f} GB/s", file=sys.stderr,
                              flush=True)
                rows.append(row)
    add_ratios(rows)
    return rows


def environment(a: argparse.Namespace) -> dict[str, Any]:
    """CPU, versions and settings printed above the tables."""
    import torch

    from llamarun.device import device_name

    cpu = device_name(torch.device("cpu"))  # the model name from /proc/cpuinfo where Linux has it
    versions = {}
    for pkg in ("torch", "llama_cpp_python", "transformers", "llamarun"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, **versions, "threads": a.threads, "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens, "tg_prompt_tokens": TG_PROMPT, "reps": a.reps}


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else format(value, fmt)


def print_tables(env: dict[str, Any], rows: list[dict]) -> None:
    """One plain-text table per model, under a header line."""
    print(f"{env['cpu']}; torch {env.get('torch', '?')}, llama-cpp-python "
          f"{env.get('llama_cpp_python', '-')}, transformers {env.get('transformers', '-')}; "
          f"{env['threads']} threads; pp{env['prompt_tokens']}, tg{env['gen_tokens']} "
          f"(after {env['tg_prompt_tokens']} tokens); median of {env['reps']}")
    reads = [r["read_gb_s"] for r in rows if r.get("read_gb_s")]
    if reads:
        print(f"memory read around each turn: {min(reads):.1f}-{max(reads):.1f} GB/s "
              f"(1 GiB, the faster of ordinary and huge pages, {env['threads']} threads; each "
              f"row's GB/s vs read uses the reads before and after its turn)")
    elif env.get("read_gb_s"):
        plain = env.get("read_plain_gb_s")
        print(f"memory read: {env['read_gb_s']:.1f} GB/s ({env['read_bytes'] >> 20} MiB, "
              f"{env['read_form']}, {env['threads']} threads"
              + (f"; {plain:.1f} in 4 KiB pages" if plain else "") + ")")
    else:
        print(f"memory read: not measured ({env.get('read_form')})")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        cols: list[tuple[str, str, str]] = [  # header, key, format
            ("pp tok/s", "pp_tok_s", ".1f"), ("tg tok/s", "tg_tok_s", ".1f"),
            ("TTFT s", "ttft_s", ".3f"), ("peak RSS MiB", "peak_rss_mib", ".0f"),
            ("GB/s", "gb_s", ".2f"), ("read GB/s", "read_gb_s", ".1f"),
            ("GB/s vs read", "gb_s_vs_read", ".2f"),
            ("pp vs llama.cpp", "pp_vs_llama_cpp", ".2f"),
            ("tg vs llama.cpp", "tg_vs_llama_cpp", ".2f")]
        if any(r["engine"] == "transformers" for r in mine):
            cols += [("pp vs HF", "pp_vs_transformers", ".2f"),
                     ("tg vs HF", "tg_vs_transformers", ".2f")]
        if any(r.get("rss_vs_file_kv") is not None for r in mine):
            cols.append(("RSS / file+KV", "rss_vs_file_kv", ".2f"))
        if any(r.get("compile_s") is not None for r in mine):
            cols.append(("compile s", "compile_s", ".1f"))
        storage_w = max([7] + [len(r.get("storage", "")) for r in mine])
        print(f"\n{model}\n{'precision':9} {'engine':17} {'storage':{storage_w}} "
              + " ".join(f"{h:>{max(len(h), 8)}}" for h, _, _ in cols))
        for r in mine:
            head = f"{r['precision']:9} {r['engine']:17} "
            if "error" in r:
                print(f"{head}{'':{storage_w}} error: {r['error']}")
                continue
            print(f"{head}{r['storage']:{storage_w}} " + " ".join(
                f"{_cell(r, k, f):>{max(len(h), 8)}}" for h, k, f in cols))


def installed_engines() -> list[str]:
    """The engines whose packages are importable (llamarun always is)."""
    have = {"transformers": "transformers", "llama.cpp": "llama_cpp"}
    return [e for e in ENGINES if e not in have or importlib.util.find_spec(have[e])]


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items
    return parse


def parse_args() -> argparse.Namespace:
    """The command line (--worker and --file/--dtype are internal)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=_csv(MODELS), default=["smollm2"],
                    help="smollm2,1b,8b (1b and 8b are opt-in: ~10 and 4.7 GB of files, long runs)")
    ap.add_argument("--precisions", type=_csv(tuple(PRECISIONS)), default=list(PRECISIONS))
    ap.add_argument("--engines", type=_csv(ENGINES), default=None,
                    help="default: every installed one of " + ",".join(ENGINES))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per engine and variant")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--read-once", action="store_true",
                    help="one memory read after all turns instead of one around each turn")
    ap.add_argument("--baseline", metavar="REV",
                    help="also run llamarun's engines from git revision REV (a worktree)")
    ap.add_argument("--worker", choices=(*ENGINES, "memory-read"), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prompt_tokens < 1 or a.gen_tokens < 1 or a.reps < 1 or a.threads < 1:
        ap.error("--prompt-tokens, --gen-tokens, --reps and --threads must be at least 1")
    return a


def main() -> None:
    """Run the comparison (or, with --worker, one measurement)."""
    a = parse_args()
    if a.worker:
        print(RESULT + json.dumps(run_worker(a)), flush=True)
        return
    engines = a.engines or installed_engines()
    if a.baseline:  # the same llamarun engines from the older revision, beside each one
        engines = [x for e in engines
                   for x in ([e, f"{e}@{a.baseline}"] if e.startswith("llamarun") else [e])]
    env = environment(a)
    rows = benchmark(a, engines)
    if a.read_once:
        print("memory read ...", file=sys.stderr, flush=True)
        read = run_one("memory-read", None, "-", a)
        env["read_gb_s"] = read.get("read_gb_s")
        env["read_plain_gb_s"] = read.get("read_plain_gb_s")
        env["read_bytes"] = read.get("read_bytes")
        env["read_form"] = read.get("read_form", read.get("error"))
        for r in rows:
            if env["read_gb_s"] and "gb_s" in r:
                r["gb_s_vs_read"] = r["gb_s"] / env["read_gb_s"]
    if a.json:
        print(json.dumps({"env": env, "rows": rows}, indent=2))
    else:
        print_tables(env, rows)


if __name__ == "__main__":
    main()
