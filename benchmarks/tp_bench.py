"""Tensor-parallel decode on one host: tok/s, peak memory per rank and the share of time in
collectives, for world sizes 1 and 2 (or --worlds), on the same file in the same run.

    python benchmarks/tp_bench.py                       # the random Llama-3.2-1B-shaped BF16 GGUF
    python benchmarks/tp_bench.py --model X --worlds 1,2 --gen-tokens 32 [--dtype bfloat16] [--json]

The machine's cores are divided among the ranks (2 cores: one thread per rank at world size 2),
so on a CPU this shows the memory per rank and the cost of the all-reduces more than a speed-up:
tensor parallelism pays where each rank has its own device (a GPU each) or memory bandwidth.
The model defaults to benchmarks/.cache/llama-1b-random.BF16.gguf (python benchmarks/variants.py
--models 1b --types BF16 writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "benchmarks" / ".cache" / "llama-1b-random.BF16.gguf"
RESULT = "@@result "


class _NoTokenizer:
    """The benchmark feeds token ids: a tokenizer is never asked for text."""

    bos_id = None
    add_bos = False
    stop_ids: frozenset[int] = frozenset()


def worker(a: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from llamarun.bench import peak_rss_bytes
    from llamarun.engine import Engine
    from llamarun.loaders import load_checkpoint
    from llamarun.parallel import Collectives, from_env, gather_object, init_group
    from llamarun.sampling import SamplingParams

    job = from_env(os.environ)
    world = job.world if job else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    tp = None
    if job is not None:
        init_group(job, cuda=False, timeout_s=600)
        tp = Collectives(job.rank, job.world)
    start = time.perf_counter()
    ck = load_checkpoint(a.model, device="cpu", dtype=a.dtype, max_seq_len=256, tp=tp)
    load_s = time.perf_counter() - start
    engine = Engine(ck, _NoTokenizer(), None)  # type: ignore[arg-type]
    prompt = list(range(1, 9))

    def decode(n: int) -> float:
        events = engine.token_events(prompt, max_new_tokens=n + 1,
                                     sampling=SamplingParams.greedy(), reuse=False)
        next(events)  # the prefill and first token are not decode
        begin = time.perf_counter()
        for _ in events:
            pass
        return time.perf_counter() - begin

    decode(2)  # warm-up
    if tp is not None:
        tp.timing, tp.seconds = True, 0.0
    seconds = decode(a.gen_tokens)
    comm = tp.seconds if tp is not None else 0.0
    mine = {"rank": job.rank if job else 0, "peak_rss_mb": peak_rss_bytes() / 2**20,
            "collective_s": comm, "decode_s": seconds, "load_s": load_s}
    ranks = gather_object(mine) if job else [mine]
    if not job or job.rank == 0:
        print(RESULT + json.dumps({
            "world": world, "threads_per_rank": torch.get_num_threads(),
            "tok_s": a.gen_tokens / seconds, "ms_per_token": 1000 * seconds / a.gen_tokens,
            "collective_share": max(r["collective_s"] for r in ranks) / seconds,
            "ranks": ranks}), flush=True)
    if job is not None:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        # Skip the interpreter's teardown, in which gloo's threads can abort the process.
        sys.stdout.flush()
        os._exit(0)


def run(world: int, a: argparse.Namespace) -> dict:
    args = [str(Path(__file__).resolve()), "--worker", "--model", str(a.model), "--dtype", a.dtype,
            "--gen-tokens", str(a.gen_tokens)]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world)] if world > 1 else [sys.executable])
    r = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((x for x in r.stdout.splitlines() if x.startswith(RESULT)), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"world size {world} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len(RESULT):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    if not a.model.exists():
        p.error(f"{a.model} does not exist (python benchmarks/variants.py --models 1b --types BF16)")
    rows = [run(int(w), a) for w in a.worlds.split(",")]
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    base = rows[0]["tok_s"]
    print(f"{a.model.name}, {a.gen_tokens} decode steps after 8 prompt tokens, {os.cpu_count()} CPUs")
    print(f"{'world':>5} {'threads/rank':>12} {'tok/s':>7} {'x world 1':>9} {'ms/token':>8} "
          f"{'in collectives':>14} {'peak RSS per rank (MiB)':>24}")
    for r in rows:
        rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
        print(f"{r['world']:>5} {r['threads_per_rank']:>12} {r['tok_s']:>7.2f} "
              f"{r['tok_s'] / base:>9.2f} {r['ms_per_token']:>8.1f} "
              f"{100 * r['collective_share']:>13.1f}% {rss:>24}")


if __name__ == "__main__":
    main()
