"""Fuzz worker: runs cases one at a time under an address-space limit and an alarm.

Started by harness.Worker as `python worker.py LIMIT_MB`; reads one JSON case per line on stdin
and answers one JSON line each: {"status": "ok" | "error" | "bug" | "hang", ...}. "error" is a
LlamarunError (the expected refusal); "bug" is any other exception, with its traceback.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import traceback
from pathlib import Path


class Timeout(BaseException):
    """The case ran past its alarm."""


def _alarm(signum: int, frame: object) -> None:
    raise Timeout


def _vmsize() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


_ENGINES: dict[str, object] = {}


def run_case(case: dict) -> None:
    """Run one case; return normally for a correct result, raise otherwise."""
    import torch

    target = case["target"]
    if target == "checkpoint":
        from llamarun.loaders import load_checkpoint

        ck = load_checkpoint(case["path"], device="cpu", dtype=case.get("dtype", "float32"),
                             max_seq_len=16, quantize=case.get("quantize", "auto"))
        with torch.inference_mode():
            logits = ck.model(torch.tensor([[1, 2]]) % ck.args.vocab_size, torch.arange(2))
        assert logits.shape[-1] == ck.args.vocab_size
    elif target == "tokenizer":
        from llamarun.tokenizer import load_tokenizer

        tok = load_tokenizer(Path(case["path"]))
        ids = tok.encode(case.get("text", "Hello world"), bos=True)
        tok.decode([i for i in ids if 0 <= i < tok.vocab_size])
    elif target == "prompt":
        from llamarun.cli.common import utf8_text
        from llamarun.engine import Engine
        from llamarun.sampling import SamplingParams

        engine = _ENGINES.get(case["model"])
        if engine is None:
            engine = _ENGINES[case["model"]] = Engine.load(case["model"], device="cpu",
                                                           dtype="float32", max_seq_len=64)
        text = utf8_text(case["text"], "--prompt")  # what the CLI hands the engine
        for _ in engine.complete(text, sampling=SamplingParams.greedy(), max_new_tokens=2):
            pass
    elif target == "template":
        from llamarun.tokenizer import load_chat_format, load_tokenizer

        tok = _ENGINES.get(case["tokenizer"])
        if tok is None:
            tok = _ENGINES[case["tokenizer"]] = load_tokenizer(Path(case["tokenizer"]))
        fmt = load_chat_format(tok, None, chat_template=case["template"])  # type: ignore[arg-type]
        ids = fmt.encode_dialog(case["messages"])
        assert all(isinstance(i, int) for i in ids)
    elif target == "cli":
        from typer.testing import CliRunner

        from llamarun.cli import app

        r = CliRunner().invoke(app, case["args"], input=case.get("input"),
                               env={"LLAMARUN_MODEL": None, "LLAMARUN_COMPILE": "0"})
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        if "Traceback" in r.output or r.exit_code not in (0, 1, 2):
            raise AssertionError(f"exit {r.exit_code}: {r.output[-500:]}")
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        if r.exit_code == 1 and len(errors) != 1:
            raise AssertionError(f"exit 1 without exactly one error line: {r.stderr[-500:]}")
    else:
        raise ValueError(f"unknown target {target}")


def main() -> None:
    limit = int(sys.argv[1]) << 20
    import torch

    torch.set_num_threads(1)
    import llamarun.cli  # noqa: F401  (everything imported before the limit is set)
    from llamarun.errors import LlamarunError
    from llamarun.loaders import load_checkpoint  # noqa: F401
    from llamarun.tokenizer import load_tokenizer  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (_vmsize() + limit, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _alarm)
    sys.stdout.write(json.dumps({"status": "ready"}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        case = json.loads(line)
        signal.alarm(int(case.get("timeout", 10)))
        try:
            run_case(case)
            out = {"status": "ok"}
        except LlamarunError as e:
            out = {"status": "error", "message": str(e)[:300]}
        except Timeout:
            out = {"status": "hang"}
        except BaseException as e:  # noqa: BLE001 (every other ending is a finding)
            out = {"status": "bug", "type": type(e).__name__,
                   "traceback": traceback.format_exc()[-2500:]}
        finally:
            signal.alarm(0)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
