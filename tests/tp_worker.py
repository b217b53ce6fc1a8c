"""A tensor-parallel rank for the tests (run by torchrun, or alone for the reference): loads each
checkpoint it is given with this rank's slices and writes, from rank 0, the full logits of a
fixed prompt, greedy tokens, and what each rank read.

    torchrun --nproc-per-node N tests/tp_worker.py OUT.pt SPEC.json
SPEC: [{"path": ..., "quantize": "none", "dtype": "float32", "compile": false}, ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from llamarun.engine import Engine
from llamarun.loaders import load_checkpoint
from llamarun.parallel import Collectives, from_env, gather_object, init_group
from llamarun.sampling import SamplingParams

PROMPT = [1, 43, 47, 61, 78, 5, 9, 11]


class _NoTokenizer:
    """The worker feeds token ids: a tokenizer is never asked for text."""

    bos_id = None
    add_bos = False
    stop_ids: frozenset[int] = frozenset()


def run(spec: dict, tp: Collectives | None) -> dict:
    ck = load_checkpoint(spec["path"], device="cpu", dtype=spec.get("dtype", "float32"),
                         quantize=spec.get("quantize", "none"), max_seq_len=64, tp=tp)
    model = ck.model
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))).clone()
        model.reset_caches()
    engine = Engine(ck, _NoTokenizer(), None, compile=spec.get("compile", False))  # type: ignore[arg-type]
    engine.wait_compiled()
    events = engine.token_events(PROMPT, max_new_tokens=12, sampling=SamplingParams.greedy())
    tokens = [e.id for e in events]
    reader = ck.raw.extra.get("reader")
    read = {"opened": sorted(ck.raw.extra.get("opened", {})),
            "bytes": getattr(reader, "bytes_read", None),
            "kv_heads": model.layers[0].attention.kv_cache.k_cache.shape[1]}
    return {"logits": logits, "tokens": tokens, "compiled": engine.compiled_in_use,
            "read": gather_object(read) if tp is not None else [read]}


def main() -> None:
    out, spec_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    job = from_env(os.environ)
    tp = None
    if job is not None:
        init_group(job, cuda=False, timeout_s=60)
        tp = Collectives(job.rank, job.world)
    with open(spec_path) as f:
        specs = json.load(f)
    results = [run(spec, tp) for spec in specs]
    if job is None or job.rank == 0:
        torch.save(results, out)
    if job is not None:
        dist.barrier()
        dist.destroy_process_group()
        # Skip the interpreter's teardown, in which gloo's threads can abort the process.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
