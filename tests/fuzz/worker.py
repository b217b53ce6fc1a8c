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


class _Session:
    """What the chat REPL's /load touches of a conversation."""

    def __init__(self) -> None:
        self.messages = [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "yes"}]
        self.system: str | None = "unsaved"

    def clear(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None


def _saved_chat_case(case: dict) -> None:
    """A saved chat: it loads (then saves and loads back the same) or is one InvalidArgumentError;
    /load of it in the REPL replaces the conversation, or leaves it as it was when refused."""
    from llamarun.cli.repl import Repl
    from llamarun.errors import InvalidArgumentError
    from llamarun.sampling import SamplingParams
    from llamarun.saved_chat import load_chat, save_chat

    session = _Session()
    before = [dict(m) for m in session.messages]
    repl = Repl(session, SamplingParams(), max_tokens=8, stop=[], interactive=True)  # type: ignore[arg-type]
    try:
        chat = load_chat(case["path"])
    except InvalidArgumentError:
        repl.load(case["path"])
        assert session.messages == before and session.system == "unsaved"
        raise
    repl.load(case["path"])
    assert session.messages == chat.messages and session.system == chat.system
    save_chat(case["out"], chat)
    assert load_chat(case["out"]) == chat


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
    elif target == "saved_chat":
        _saved_chat_case(case)
    elif target == "template":
        from llamarun.tokenizer import load_chat_format, load_tokenizer

        tok = _ENGINES.get(case["tokenizer"])
        if tok is None:
            tok = _ENGINES[case["tokenizer"]] = load_tokenizer(Path(case["tokenizer"]))
        fmt = load_chat_format(tok, None, chat_template=case["template"])  # type: ignore[arg-type]
        ids = fmt.encode_dialog(case["messages"])
        assert all(isinstance(i, int) for i in ids)
    elif target == "http":
        _http_case(case)
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


def _http_case(case: dict) -> None:
    """One request to the OpenAI server's ASGI app (no socket): a 2xx answer is a result, a 4xx
    in OpenAI's error shape a refusal (InvalidArgumentError); anything else is a bug."""
    import asyncio

    from llamarun.errors import InvalidArgumentError

    served = _ENGINES.get(("http", case["model"]))
    if served is None:
        from llamarun.engine import Engine
        from llamarun.server import create_app

        engine = Engine.load(case["model"], device="cpu", dtype="float32", max_seq_len=64,
                             slots=2)
        app = create_app(engine, model_id="fuzz", api_key=case.get("api_key"))
        loop = asyncio.new_event_loop()
        lifespan = app.router.lifespan_context(app)  # kept: collecting it would stop the app
        loop.run_until_complete(lifespan.__aenter__())
        served = _ENGINES[("http", case["model"])] = (loop, app, lifespan)
    loop, app, _ = served
    status, headers, body = loop.run_until_complete(_asgi_request(
        app, case["method"], case["path"], case["headers"],
        [p.encode("latin-1") for p in case["parts"]]))
    kind = headers.get(b"content-type", b"").decode()
    if status >= 400:
        assert status < 500 and kind.startswith("application/json"), (status, kind, body[:300])
        error = json.loads(body)
        assert list(error) == ["error"], body[:300]
        assert set(error["error"]) == {"message", "type", "param", "code"}, body[:300]
        param = error["error"]["param"]
        assert param is None or (isinstance(param, str) and not param.isdigit()), param
        raise InvalidArgumentError(f"{status} {error['error']['code']}: {error['error']['message']}")
    assert status == 200, (status, body[:300])
    if kind.startswith("text/event-stream"):
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for e in events[:-1]:
            assert "error" not in json.loads(e.removeprefix("data: ")), e
    else:
        json.loads(body)


async def _asgi_request(app: object, method: str, path: str, headers: list[list[str]],
                        parts: list[bytes]) -> tuple[int, dict[bytes, bytes], bytes]:
    """Call `app` as an HTTP server would, with the body in `parts`; (status, headers, body)."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.encode().lower(), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    messages = [{"type": "http.request", "body": p, "more_body": i + 1 < len(parts)}
                for i, p in enumerate(parts or [b""])]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stays: only a disconnect would come
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[operator]
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers", [])), body


def main() -> None:
    limit = int(sys.argv[1]) << 20
    import torch

    torch.set_num_threads(1)
    import llamarun.cli  # noqa: F401  (everything imported before the limit is set)
    from llamarun.errors import LlamarunError
    from llamarun.loaders import load_checkpoint  # noqa: F401
    from llamarun.server import create_app  # noqa: F401
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
