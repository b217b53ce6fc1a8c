"""Speculative decoding against plain decoding of the same model, in one run.

Cases (each: the same greedy request decoded plainly and speculatively, alternating, --reps times;
medians of decode tok/s; the tokens must be identical):
- self:   SmolLM2-135M in float32 (benchmarks/variants.py writes the F32 GGUF) drafted for by the
          same model as stored in its int4 (Q4_1) GGUF;
- lookup: SmolLM2-135M as stored (Q4_1) with prompt lookup, on an input-grounded task (adding
          type hints to given code: the answer copies most of its input);
- lookup32: the same in float32 (whose greedy tokens must be identical);
- 1b:     a random Llama-3.2-1B-shaped model (--type-1b, F32) drafted for by a 2-layer model made of its own
          first layers (random weights agree on nothing: this measures the overhead when drafts
          are all rejected).

    python benchmarks/speculative.py [--cases self,lookup,1b] [--tokens 128] [--reps 3]
        [--draft-tokens 4] [--compile] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import variants  # noqa: E402
from llamarun.engine import Engine  # noqa: E402
from llamarun.resolve import embedded_default_model  # noqa: E402
from llamarun.sampling import SamplingParams  # noqa: E402
from llamarun.speculative import SpecConfig  # noqa: E402

CASES = ("self", "lookup", "lookup32", "1b")

CODE = '''def merge_intervals(intervals):
    """Merge overlapping intervals and return them sorted by start."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]


def count_words(text, ignore_case=True):
    """Count how often each word occurs in text."""
    counts = {}
    for word in text.split():
        word = word.strip(".,;:!?\\"'()")
        if ignore_case:
            word = word.lower()
        if not word:
            continue
        counts[word] = counts.get(word, 0) + 1
    return counts


def moving_average(values, window):
    """The average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def find_duplicates(items):
    """The items that occur more than once, in the order they first repeat."""
    seen = set()
    repeated = []
    for item in items:
        if item in seen and item not in repeated:
            repeated.append(item)
        seen.add(item)
    return repeated
'''

LOOKUP_TASK = ("Add Python type hints to every function below. Keep everything else exactly as "
               "it is, and answer with the complete code only.\n\n" + CODE)
STORY_TASK = "Write a short story about a robot who learns to paint."


def chat_prompt(engine: Engine, text: str) -> list[int]:
    return engine.chat_format.encode_dialog([{"role": "user", "content": text}])


def decode_once(engine: Engine, prompt: list[int], tokens: int) -> tuple[float, tuple[int, ...],
                                                                          object]:
    # From an empty cache: a reused prompt would be prefilled but for its last token, recomputed
    # by a one-row pass, whose key and value can differ in the last bits from the whole prompt's
    # pass (prompt products on AMX CPUs are another kernel's), so the plain and speculative
    # replies could differ for that alone (measured: the default model's lookup reply forked at
    # its fourth token and ended after 8).
    engine.cache.clear()
    g = engine.generate(prompt, sampling=SamplingParams.greedy(), max_new_tokens=tokens)
    for _ in g:
        pass
    r = g.result
    return r.decode_tok_s, r.token_ids, r


def compare(name: str, engine: Engine, spec: SpecConfig, draft: Engine | None,
            prompt: list[int], a: argparse.Namespace) -> dict[str, object]:
    """Plain and speculative decoding of the same request, alternating; medians."""
    speculator = None
    if draft is not None or spec.lookup is not None:
        engine.speculate(spec, draft)
        speculator = engine.scheduler.speculator
    if a.compile:
        engine.wait_compiled()
    plain_tok_s, spec_tok_s, same = [], [], True
    accepted = drafted = 0
    per_step = []
    for rep in range(a.reps + 1):  # the first round warms up
        engine.scheduler.speculator = None
        p, plain_ids, _ = decode_once(engine, prompt, a.tokens)
        engine.scheduler.speculator = speculator
        s, spec_ids, r = decode_once(engine, prompt, a.tokens)
        same = same and spec_ids == plain_ids
        if rep == 0:
            continue
        plain_tok_s.append(p)
        spec_tok_s.append(s)
        drafted += r.drafted_tokens  # type: ignore[attr-defined]
        accepted += r.accepted_tokens  # type: ignore[attr-defined]
        per_step.append(r.tokens_per_step or 1.0)  # type: ignore[attr-defined]
    engine.scheduler.speculator = None
    row = {
        "case": name, "tokens": len(plain_ids), "plain_tok_s": statistics.median(plain_tok_s),
        "spec_tok_s": statistics.median(spec_tok_s), "identical": same,
        "acceptance": accepted / drafted if drafted else 0.0,
        "tokens_per_step": statistics.median(per_step), "draft_tokens": spec.draft_tokens,
    }
    row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]  # type: ignore[operator]
    return row


def load(path: Path, dtype: str, a: argparse.Namespace, **kw: object) -> Engine:
    return Engine.load(path, dtype=dtype, max_seq_len=a.max_seq_len, compile=a.compile,
                       **kw)  # type: ignore[arg-type]


def case_self(a: argparse.Namespace) -> dict[str, object]:
    f32 = variants.smollm2_variants(types=("F32",))["F32"]
    target = load(f32, "float32", a)
    draft = load(embedded_default_model()[0], "auto", a)
    return compare("self-draft: SmolLM2 F32 <- its Q4_1", target,
                   SpecConfig(draft_tokens=a.draft_tokens, adaptive=a.adaptive), draft,
                   chat_prompt(target, STORY_TASK), a)


def case_lookup(a: argparse.Namespace) -> dict[str, object]:
    target = load(embedded_default_model()[0], "auto", a)
    return compare("prompt lookup: SmolLM2 Q4_1, code edit", target,
                   SpecConfig(draft_tokens=a.draft_tokens, lookup=a.lookup, adaptive=a.adaptive), None,
                   chat_prompt(target, LOOKUP_TASK), a)


def case_lookup32(a: argparse.Namespace) -> dict[str, object]:
    target = load(variants.smollm2_variants(types=("F32",))["F32"], "float32", a)
    return compare("prompt lookup: SmolLM2 F32, code edit", target,
                   SpecConfig(draft_tokens=a.draft_tokens, lookup=a.lookup, adaptive=a.adaptive), None,
                   chat_prompt(target, LOOKUP_TASK), a)


def case_1b(a: argparse.Namespace) -> dict[str, object]:
    kind = a.type_1b
    full = variants.llama_1b_variants(types=(kind,))[kind]
    shape = variants.Llama1BShape(n_layers=2)
    plan = list(variants._llama_plan(shape))
    index = {t.name: i for i, t in enumerate(plan)}  # the same seeds as the full model's

    def source(name: str, tshape: tuple[int, ...]) -> object:
        return variants.random_tensor(index[name], tshape)

    small = variants.write_variants(variants.DEFAULT_DIR, "llama-1b-random-2layers", "llama",
                                    variants._llama_fields(shape), plan, source, (kind,))[kind]
    target = load(full, "auto", a)
    draft = load(small, "auto", a)
    prompt = target.encode_prompt("t300 t301 t302 t303")
    return compare(f"random 1B {kind} <- its first 2 layers", target,
                   SpecConfig(draft_tokens=a.draft_tokens, adaptive=a.adaptive), draft, prompt, a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="self,lookup", help=",".join(CASES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--lookup", type=int, default=3, help="n-gram size for prompt lookup")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode steps")
    ap.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                    help="draft --draft-tokens every step (no per-row adaptation or pauses)")
    ap.add_argument("--type-1b", default="F32", choices=variants.TYPES,
                    help="the 1B case's GGUF type (F32: about 5 GB)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{'compiled' if a.compile else 'eager'}, greedy, {a.tokens} tokens, "
          f"{'adaptive' if a.adaptive else 'fixed'} draft length, "
          f"median of {a.reps}", flush=True)
    rows = []
    for case in a.cases.split(","):
        start = time.perf_counter()
        row = {"self": case_self, "lookup": case_lookup, "lookup32": case_lookup32,
               "1b": case_1b}[case](a)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['case']}: plain {row['plain_tok_s']:.1f} tok/s, speculative "
                  f"{row['spec_tok_s']:.1f} tok/s = {row['speedup']:.2f}x; accepted "
                  f"{100 * row['acceptance']:.0f}%, {row['tokens_per_step']:.2f} tokens per target "
                  f"step (K={row['draft_tokens']}); tokens identical: {row['identical']}; "
                  f"{row['tokens']} tokens" + (" (the reply ended early: too short to time)"
                                               if row["tokens"] < a.tokens // 2 else ""),
                  flush=True)


if __name__ == "__main__":
    main()
