"""Peak host memory while loading a ~500 MB checkpoint, per layout and target dtype.

Writes a random Llama checkpoint (bf16 safetensors, HF layout, ~500 MB, and the same weights as
a Meta consolidated.00.pth) to a temporary folder, then loads each in a fresh process and prints
the peak RSS next to the size of the model in the target dtype.

    python benchmarks/load_memory.py [--dim 1024 --layers 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CHILD = r"""
import sys, time, torch
from llamarun.loaders import load_checkpoint
def status(key):  # kB; VmHWM is the peak RSS of this process image (reset by exec)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
import threading
anon_peak = [0]
done = threading.Event()
def sample():  # file-backed pages of the mmapped checkpoint are page cache; anon is what we own
    while not done.is_set():
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
        time.sleep(0.002)
torch.set_num_threads(2)
base = status("VmRSS")
base_anon = status("RssAnon")
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
ck = load_checkpoint(sys.argv[1], device="cpu", dtype=sys.argv[2], max_seq_len=256)
dt = time.perf_counter() - t0
peak = status("VmHWM")
done.set()
size = sum(p.numel() * p.element_size() for p in ck.model.parameters())
print(f"{base / 1024:.0f} {peak / 1024:.0f} {size / 2**20:.0f} {dt:.2f} "
      f"{(anon_peak[0] - base_anon) / 1024:.0f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    from llamarun.config import ModelArgs
    from model_util import random_meta_state_dict, write_hf_folder, write_meta_folder

    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, n_kv_heads=a.dim // 256,
                     vocab_size=a.vocab, hidden_dim=int(a.dim * 8 / 3) // 64 * 64, head_dim=64)
    with tempfile.TemporaryDirectory() as tmp:
        sd = {k: v.to(torch.bfloat16) for k, v in random_meta_state_dict(args).items()}
        hf = write_hf_folder(Path(tmp) / "hf", args, sd)
        params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                  "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
                  "multiple_of": 64, "ffn_dim_multiplier": args.hidden_dim / int(8 * args.dim / 3)}
        meta = write_meta_folder(Path(tmp) / "meta", params, [sd])
        (meta / "params.json").write_text(json.dumps(params))
        del sd
        file_mb = (hf / "model.safetensors").stat().st_size / 2**20
        print(f"checkpoint: {args.n_params / 1e6:.0f} M params, {file_mb:.0f} MB bf16 on disk")
        print(f"{'layout':6} {'dtype':9} {'model MB':>9} {'peak RSS MB':>12} {'RSS - start':>12}"
              f" {'peak/model':>10} {'anon peak MB':>12} {'anon/model':>10} {'load s':>7}")
        for folder, layout in ((hf, "hf"), (meta, "meta")):
            for dtype in ("bfloat16", "float32"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype],
                                     capture_output=True, text=True, check=True).stdout.split()
                base, peak, size, secs, anon = (float(x) for x in out)
                print(f"{layout:6} {dtype:9} {size:9.0f} {peak:12.0f} {peak - base:12.0f}"
                      f" {(peak - base) / size:10.2f} {anon:12.0f} {anon / size:10.2f}"
                      f" {secs:7.2f}")


if __name__ == "__main__":
    main()
