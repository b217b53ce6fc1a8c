"""Load test of `llamarun serve` (and, optionally, llama-cpp-python's server) on loopback.

For each number of concurrent streaming clients (1, 4, 8, 16 by default), every client sends
--requests greedy chat requests one after another (a different question each), streaming the
reply (--temperature T: sampled, each request seeded alike, so the check below still holds); the single client asks every question the others will. Reported per level: requests/s, time to first token (p50/p99), inter-token latency
(p50/p99), aggregate decode tokens/s (all completion tokens / wall time of the level), and the
ratio of aggregate tokens/s to the 1-client level. Every reply is checked complete (finish
reason, token count) and equal to the same question's reply at the 1-client level (greedy output
must not depend on the batch).

    python benchmarks/serve_load.py                      # the embedded SmolLM2 model
    python benchmarks/serve_load.py --clients 1,8 --requests 2 --max-tokens 64 \
        [--model PATH] [--dtype float32] [--peer llama.cpp] [--json]
    python benchmarks/serve_load.py --long-prompt 2048 --clients 4   # a long prompt mid-stream
    python benchmarks/serve_load.py --clients 1,8 --temperature 0.8  # sampled requests

llamarun is measured once its compiled decode step is in use (its /health says so; --no-compile
measures the eager step). --reference also times the same questions in one process, through
the library (a chat session per question, as `llamarun chat` and `complete` run: no HTTP, the
same slots and context, so the same compiled graphs): the single stream's decode rate (1 / its
inter-token p50) against that one's tells what serving costs.

--long-prompt N: while --clients clients stream long raw completions (counting on from "1, 2,
..., 10,", which goes on for all of --long-stream-tokens), one more request brings an N-token
prompt; reported are the streaming clients' inter-token latencies
p50 outside the long prompt's prefill and p99 while it was being prefilled (from its arrival to
its first token), and that prefill's time.

Bounded: loopback only, at most --clients x --requests requests per level, and --timeout s
per request. llama-cpp-python's server (--peer llama.cpp) serves one request at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SEED = 1  # every sampled request's seed (--temperature)
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
    cmd = [sys.executable, "-m", "llamarun", "serve", "--port", str(port), "--quiet",
           "--max-concurrency", str(slots), "--max-seq-len", str(a.max_seq_len), "--dtype", a.dtype,
           "--compile" if a.compile else "--no-compile"]
    if a.prefill_chunk:
        cmd += ["--prefill-chunk", str(a.prefill_chunk)]
    if a.model:
        cmd += ["--model", a.model]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama_cpp(a: argparse.Namespace, port: int, model: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
           "--n_ctx", str(a.max_seq_len), "--n_threads", str(os.cpu_count() or 1)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_compiled(url: str, timeout: float) -> None:
    """Until llamarun's /health says its compiled decode step is in use (or cannot be)."""
    base = url.removesuffix("/v1")
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            state = json.load(r).get("compiled", "off")
        if state in ("in use", "off", "failed"):
            print(f"  llamarun: compiled decode step {state}", file=sys.stderr)
            return
        if state == "ready":  # it takes over at the next request started while none runs
            one_request(url, QUESTIONS[0], argparse.Namespace(max_tokens=2, timeout=60))
            continue
        time.sleep(1)
    raise RuntimeError(f"the compiled step was not in use after {timeout} s ({state})")


def one_request(url: str, question: str, a: argparse.Namespace,
                max_tokens: int | None = None, raw: bool = False) -> dict[str, Any]:
    """A streamed chat request, greedy or at --temperature with seed SEED (raw: a text
    completion of `question` instead)."""
    temperature = getattr(a, "temperature", 0.0)
    body = {"model": "m", "max_tokens": max_tokens or a.max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if temperature > 0:  # seeded: a question's reply is the same whatever runs beside it
        body["seed"] = SEED
    if raw:
        body["prompt"] = question
    else:
        body["messages"] = [{"role": "user", "content": question}]
    req = urllib.request.Request(url + ("/completions" if raw else "/chat/completions"),
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    stamps: list[float] = []
    text, finish, usage = [], None, None
    with urllib.request.urlopen(req, timeout=a.timeout) as r:
        for data in r:
            line = data.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("text") if raw else (choice.get("delta") or {}).get("content")
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
    if usage is None:  # a server without stream usage (llama-cpp-python): a chunk per token
        usage = {"completion_tokens": len(stamps)}
    return {"question": question, "text": "".join(text), "finish": finish, "usage": usage,
            "ttft": stamps[0] - start if stamps else None, "start": start, "stamps": stamps,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "end": time.perf_counter()}


def pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None


def long_prompt_level(url: str, name: str, a: argparse.Namespace) -> dict[str, Any]:
    """--clients streams, then one request with an --long-prompt-token prompt (a repeated
    paragraph) once they are all under way; their inter-token latencies during its prefill."""
    streams: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        # Counting on: a reply that goes on for all of --long-stream-tokens (a chat answer
        # ends at its own length, often before the long prompt's prefill does).
        start = ", ".join(str(n) for n in range(1 + i, 11 + i)) + ","
        out = one_request(url, start, a, max_tokens=a.long_stream_tokens, raw=True)
        with lock:
            streams.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients_n)]
    for t in threads:
        t.start()
    time.sleep(a.long_delay)  # the streams are decoding
    paragraph = ("The quick brown fox jumps over the lazy dog while the river runs past the old "
                 "mill and the children count the boats. ")
    # About 24 tokens a paragraph for Llama-family tokenizers; the server reports the count.
    text = paragraph * max(1, a.long_prompt // 24)
    long = one_request(url, "Summarize: " + text, a, max_tokens=4)
    for t in threads:
        t.join()
    # Its first token's arrival ends the prefill (its end, if no chunk carried text).
    began = long["start"]
    first = began + long["ttft"] if long["ttft"] is not None else long["end"]
    during = [b - x for s in streams for x, b in zip(s["stamps"], s["stamps"][1:])
              if began <= b <= first + 1e-3]
    # Their p50 without the prefill (the streams' own pace), and p99 while it ran.
    outside = [b - x for s in streams for x, b in zip(s["stamps"], s["stamps"][1:])
               if b < began or x > first]
    p50, p99 = pct(outside, 0.5), pct(during, 0.99)
    return {"engine": name, "clients": a.clients_n,
            "prompt_tokens": (long["usage"] or {}).get("prompt_tokens"),
            "prefill_s": first - began, "long_reply": long["text"],
            "itl_p50": p50, "itl_p99_during": p99,
            "gaps_during": len(during),
            "ratio": (p99 / p50) if p50 and p99 else None,
            "complete": all(s["finish"] in ("stop", "length") for s in streams)}


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
    kind = (f"sampled (temperature {a.temperature}, seed {SEED})" if a.temperature > 0
            else "greedy")
    print(f"{a.requests} {kind} streamed chat requests per client, max_tokens {a.max_tokens}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'engine':<10} {'clients':>7} {'req/s':>6} {'tok/s':>7} {'x1':>5} {'TTFT p50/p99 ms':>16} "
          f"{'ITL p50/p99 ms':>15} {'same':>6} {'ok':>3}")
    for r in rows:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        print(f"{r['engine']:<10} {r['clients']:>7} {r['req_s']:>6.2f} {r['tok_s']:>7.1f} "
              f"{speedup:>5} {ms(r['ttft_p50']) + '/' + ms(r['ttft_p99']):>16} "
              f"{ms(r['itl_p50']) + '/' + ms(r['itl_p99']):>15} {r['same_as_alone']:>6} "
              f"{'yes' if r['complete'] and not r['errors'] else 'NO':>3}")


def reference(a: argparse.Namespace, slots: int) -> dict[str, Any]:
    """Decode tok/s of the same questions in one process (in a subprocess of its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-worker",
           "--max-seq-len", str(a.max_seq_len), "--max-tokens", str(a.max_tokens),
           "--dtype", a.dtype, "--requests", str(a.requests), "--clients", str(slots),
           "--temperature", str(a.temperature),
           "--compile" if a.compile else "--no-compile"] + (["--model", a.model] if a.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"the in-process reference failed: {out.stderr.strip()[-300:]}")
    return json.loads(lines[-1])


def reference_worker(a: argparse.Namespace) -> None:
    """The library's chat decode on the server's settings: tok/s after each first token."""
    from llamarun.default_model import default_model_path
    from llamarun.engine import Engine
    from llamarun.sampling import SamplingParams

    model = a.model or default_model_path()
    engine = Engine.load(model, device="cpu", dtype=a.dtype, max_seq_len=a.max_seq_len,
                         compile=a.compile, slots=int(a.clients))
    engine.wait_compiled()
    rates = []
    for i in range(1 + max(3, a.requests)):  # the first is a warm-up
        sampling = (SamplingParams(temperature=a.temperature, seed=SEED) if a.temperature > 0
                    else SamplingParams.greedy())
        gen = engine.chat().send(QUESTIONS[i % len(QUESTIONS)], sampling=sampling,
                                 max_new_tokens=a.max_tokens)
        stamps = [time.perf_counter() for _ in gen]
        if i and len(stamps) > 2:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    print(json.dumps({"decode_tok_s": sorted(rates)[len(rates) // 2]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (seeded, the other sampling settings the "
                        "server's defaults) instead of greedy")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--model", help="llamarun --model (default: the embedded default model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--peer", choices=["llama.cpp"], help="also load-test llama-cpp-python's server")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="measure llamarun's compiled decode step (default) or its eager one")
    p.add_argument("--prefill-chunk", type=int, help="llamarun serve --prefill-chunk")
    p.add_argument("--long-prompt", type=int, metavar="N",
                   help="instead of the levels: a prompt of about N tokens arriving mid-stream")
    p.add_argument("--long-stream-tokens", type=int, default=1500)
    p.add_argument("--long-delay", type=float, default=3.0)
    p.add_argument("--reference", action="store_true",
                   help="also time the same questions in one process, through the library")
    p.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.reference_worker:
        reference_worker(a)
        return
    levels = [int(x) for x in a.clients.split(",")]
    if min(levels) < 1 or a.requests < 1 or not 1 <= a.max_tokens <= 4096:
        p.error("clients, requests and max-tokens must be positive")

    rows: list[dict[str, Any]] = []
    port = free_port()
    a.clients_n = max(levels)
    proc = start_llamarun(a, port, max(levels) + (1 if a.long_prompt else 0))
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_ready(url, proc, 1800)  # --compile: the graphs are built before it listens
        wait_compiled(url, 1800)
        if a.long_prompt:
            one_request(url, QUESTIONS[0], a, max_tokens=4)
            rows.append(long_prompt_level(url, "llamarun", a))
        else:
            rows += bench("llamarun", url, levels, a)
    finally:
        proc.send_signal(2)
        proc.wait(60)
    if a.peer == "llama.cpp" and not a.long_prompt:  # it serves one request at a time
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
    ref = None
    if a.reference and not a.long_prompt and 1 in levels:
        ref = reference(a, max(levels))
        one = next(r for r in rows if r["engine"] == "llamarun" and r["clients"] == 1)
        ref["serve_decode_tok_s"] = 1 / one["itl_p50"] if one["itl_p50"] else None
    if a.json:
        for r in rows:
            r.pop("answers", None)
        if ref is not None:
            rows.append({"engine": "llamarun in process", **ref})
        print(json.dumps(rows, indent=1))
    elif a.long_prompt:
        for r in rows:
            ms = {k: "-" if r[k] is None else f"{r[k] * 1000:.0f}"
                  for k in ("itl_p50", "itl_p99_during")}
            print(f"{r['engine']}: {r['clients']} streams; a {r['prompt_tokens']}-token prompt "
                  f"prefilled in {r['prefill_s']:.2f} s; their inter-token p50 {ms['itl_p50']} ms, "
                  f"p99 during the prefill {ms['itl_p99_during']} ms ({r['gaps_during']} gaps), "
                  f"ratio {r['ratio']:.2f}; complete: {r['complete']}")
    else:
        show(rows, a)
    if ref is not None and not a.json:
        serve = ref["serve_decode_tok_s"]
        print(f"one stream's decode: serve {serve:.1f} tok/s (1 / inter-token p50), in process "
              f"{ref['decode_tok_s']:.1f} tok/s (a chat session, same slots and context): "
              f"{serve / ref['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
