"""Load test of `llamarun serve` (and, optionally, llama-cpp-python's server) on loopback.

For each number of concurrent streaming clients (1, 4, 8, 16 by default), every client sends
--requests greedy chat requests one after another (a different question each), streaming the
reply; the single client asks every question the others will. Reported per level: requests/s, time to first token (p50/p99), inter-token latency
(p50/p99), aggregate decode tokens/s (all completion tokens / wall time of the level), and the
ratio of aggregate tokens/s to the 1-client level. Every reply is checked complete (finish
reason, token count) and equal to the same question's reply at the 1-client level (greedy output
must not depend on the batch).

    python benchmarks/serve_load.py                      # the embedded SmolLM2 model
    python benchmarks/serve_load.py --clients 1,8 --requests 2 --max-tokens 64 \
        [--model PATH] [--dtype float32] [--peer llama.cpp] [--json]

Bounded: loopback only, at most --clients x --requests requests per level, and --timeout s
per request. llama-cpp-python's server (--peer llama.cpp) serves one request at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?", "Name three colours of the rainbow.",
    "Why is the sky blue?", "Give me a short poem about the sea.", "What is 12 times 7?",
    "Describe a cat in one sentence.", "What do bees make?", "How many legs does a spider have?",
    "What is the largest planet?", "Tell me a fun fact about octopuses.",
    "What is the boiling point of water?", "Suggest a name for a puppy.",
    "What language is spoken in Brazil?", "Why do leaves change colour?",
    "What is a haiku?", "How does a rainbow form?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError("the server did not come up")


def start_llamarun(a: argparse.Namespace, port: int, slots: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llamarun", "serve", "--port", str(port),
           "--max-concurrency", str(slots), "--max-seq-len", str(a.max_seq_len), "--dtype", a.dtype]
    if a.model:
        cmd += ["--model", a.model]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama_cpp(a: argparse.Namespace, port: int, model: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
           "--n_ctx", str(a.max_seq_len), "--n_threads", str(os.cpu_count() or 1)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_request(url: str, question: str, a: argparse.Namespace) -> dict[str, Any]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": question}],
                       "max_tokens": a.max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    stamps: list[float] = []
    text, finish, usage = [], None, None
    with urllib.request.urlopen(req, timeout=a.timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
    if usage is None:  # a server without stream usage (llama-cpp-python): a chunk per token
        usage = {"completion_tokens": len(stamps)}
    return {"question": question, "text": "".join(text), "finish": finish, "usage": usage,
            "ttft": stamps[0] - start if stamps else None,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "end": time.perf_counter()}


def run_level(url: str, clients: int, a: argparse.Namespace, requests: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(requests):
            q = QUESTIONS[(i * requests + r) % len(QUESTIONS)]
            try:
                out = one_request(url, q, a)
            except Exception as e:  # noqa: BLE001 (reported, counted as a failure)
                with lock:
                    errors.append(f"{q}: {e}")
                continue
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum((r["usage"] or {}).get("completion_tokens", 0) for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    itl = sorted(x for r in results for x in r["itl"])

    def pct(xs: list[float], p: float) -> float | None:
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None

    return {"clients": clients, "requests": len(results), "errors": errors, "wall_s": wall,
            "req_s": len(results) / wall, "tok_s": tokens / wall, "completion_tokens": tokens,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99),
            "answers": {r["question"]: r["text"] for r in results},
            "complete": all(r["finish"] in ("stop", "length") and r["usage"] for r in results)}


def bench(name: str, url: str, levels: list[int], a: argparse.Namespace) -> list[dict[str, Any]]:
    one_request(url, QUESTIONS[0], a)  # warm-up
    rows = []
    # The 1-client level asks every question the others ask: their answers must equal these.
    alone = min(len(QUESTIONS), max(levels) * a.requests)
    for n in levels:
        row = run_level(url, n, a, a.requests if n > 1 else max(a.requests, alone))
        row["engine"] = name
        rows.append(row)
        print(f"  {name}: {n} clients done ({row['wall_s']:.1f} s)", file=sys.stderr)
    base = next((r for r in rows if r["clients"] == 1), rows[0])
    for r in rows:
        r["speedup"] = r["tok_s"] / base["tok_s"] if base["tok_s"] else None
        same = [q for q, t in r["answers"].items() if base["answers"].get(q, t) == t]
        r["same_as_alone"] = f"{len(same)}/{len(r['answers'])}"
    return rows


def show(rows: list[dict[str, Any]], a: argparse.Namespace) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f}"
    print(f"{a.requests} greedy streamed chat requests per client, max_tokens {a.max_tokens}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'engine':<10} {'clients':>7} {'req/s':>6} {'tok/s':>7} {'x1':>5} {'TTFT p50/p99 ms':>16} "
          f"{'ITL p50/p99 ms':>15} {'same':>6} {'ok':>3}")
    for r in rows:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        print(f"{r['engine']:<10} {r['clients']:>7} {r['req_s']:>6.2f} {r['tok_s']:>7.1f} "
              f"{speedup:>5} {ms(r['ttft_p50']) + '/' + ms(r['ttft_p99']):>16} "
              f"{ms(r['itl_p50']) + '/' + ms(r['itl_p99']):>15} {r['same_as_alone']:>6} "
              f"{'yes' if r['complete'] and not r['errors'] else 'NO':>3}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--model", help="llamarun --model (default: the embedded default model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--peer", choices=["llama.cpp"], help="also load-test llama-cpp-python's server")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    if min(levels) < 1 or a.requests < 1 or not 1 <= a.max_tokens <= 4096:
        p.error("clients, requests and max-tokens must be positive")

    rows: list[dict[str, Any]] = []
    port = free_port()
    proc = start_llamarun(a, port, max(levels))
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1", proc, 300)
        rows += bench("llamarun", f"http://127.0.0.1:{port}/v1", levels, a)
    finally:
        proc.send_signal(2)
        proc.wait(60)
    if a.peer == "llama.cpp":
        sys.path.insert(0, str(REPO))
        from llamarun.default_model import default_model_path

        model = a.model or str(default_model_path())
        port = free_port()
        proc = start_llama_cpp(a, port, model)
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1", proc, 300)
            rows += bench("llama.cpp", f"http://127.0.0.1:{port}/v1", levels, a)
        except RuntimeError as e:  # not installed with its server extras, say
            print(f"llama.cpp server skipped: {e} (pip install 'llama-cpp-python[server]')",
                  file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(60)
    if a.json:
        for r in rows:
            r.pop("answers")
        print(json.dumps(rows, indent=1))
    else:
        show(rows, a)


if __name__ == "__main__":
    main()
