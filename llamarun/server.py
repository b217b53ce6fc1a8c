"""An OpenAI-compatible HTTP server over an Engine, decoding concurrent requests in batches.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with server-sent events when
`stream` is set), GET /v1/models, GET /health. Errors have OpenAI's shape
({"error": {"message", "type", "param", "code"}}) and status: 400 bad parameters or a body that
is not JSON, 401 bad key, 404/405 unknown route or method, 408 body too slow, 413 prompt longer
than the context (or body too large), 429 queue full, 503 shutting down (or no longer able to
serve: see refuse_requests) or too many connections.
Limits on bodies and connections: llamarun.server_limits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from llamarun import structured, tools as tooling
from llamarun.generation import Event, Failed, Token
from llamarun.scheduler import QueueFull, Request, Scheduler, Stopped, Ticket
from llamarun.engine import Engine
from llamarun.errors import InvalidArgumentError, LlamarunError
from llamarun.generation import GenerationResult, TextChunk
from llamarun.sampling import Constraint, SamplingParams
from llamarun.server_limits import (
    USAGE_KEY, APIError, ConnectionLimits, RequestGuard, check_api_key, guarded_protocol,
)
from llamarun.tokenizer.base import valid_text

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
BODY_TIMEOUT_S = 60.0  # from the request head to the body's end
MAX_JSON_DEPTH = 32  # nesting of a request body (OpenAI's own bodies need 5)
MAX_TOP_LOGPROBS = 20

__all__ = ["APIError", "ConnectionLimits", "check_api_key", "create_app", "is_loopback", "listen",
           "make_server", "refuse_requests"]


# -- request bodies ----------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (llama.cpp, vLLM)
    min_p: float | None = None  # extension
    repeat_penalty: float | None = None  # extension
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict[str, Any] | None = None  # {"type": "json_object" | "json_schema", ...}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False


_BodyT = TypeVar("_BodyT", bound=_Body)


# -- the application ---------------------------------------------------------------------------

def create_app(engine: Engine, *, model_id: str, api_key: str | None = None,
               max_queue: int = 64, max_tokens_default: int = 512,
               sampling: SamplingParams | None = None,
               body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The ASGI application serving `engine` (its KV cache slots are the concurrent requests).

    `sampling` holds the defaults for the fields a request leaves out (llamarun's by default);
    Requests go to the engine's scheduler, whose loop runs in a thread while the app is up.
    A request body must arrive within `body_timeout` seconds of its head. InvalidArgumentError
    if `api_key` is not printable ASCII.
    """
    if api_key is not None:
        check_api_key(api_key)
    defaults = sampling or SamplingParams()
    batcher = engine.scheduler
    created = int(time.time())
    grammars = structured.GrammarCompiler(engine.tokenizer)  # response_format, bound to the vocabulary

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="llamarun", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, dependencies=[Depends(_serving)])
    app.state.batcher = batcher
    app.state.refusing = None  # why every request is refused (refuse_requests), or None
    # Outermost: the key and the body's size and time are checked before any route reads it.
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=MAX_BODY_BYTES,
                       body_timeout=body_timeout)

    @app.exception_handler(HTTPException)
    async def http_error(http: HTTPRequest, e: HTTPException) -> Response:
        if isinstance(e, APIError):
            return e.response()
        path = http.url.path
        if e.status_code == 404:
            return APIError(404, f"no route {path} (see /v1/models, /v1/chat/completions, "
                                 "/v1/completions, /health)", code="not_found").response()
        if e.status_code == 405:
            return APIError(405, f"{http.method} is not allowed on {path}",
                            code="method_not_allowed", headers=e.headers).response()
        return APIError(e.status_code, str(e.detail), headers=e.headers).response()

    @app.exception_handler(Exception)
    async def failed(_: HTTPRequest, e: Exception) -> Response:
        return APIError(500, "internal server error", type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        active, waiting = batcher.busy
        out = {"status": "ok", "slots": len(engine.slots), "active": active, "waiting": waiting,
               "decode_steps": batcher.steps, "decoded_rows": batcher.batched_rows,
               "compiled": engine.compile_state}
        spec = engine.speculator
        if spec is not None:  # speculative decoding: what was drafted and kept so far
            out["speculative"] = {"kind": spec.kind, "draft_tokens": spec.config.draft_tokens,
                                  "drafted": spec.drafted, "accepted": spec.accepted,
                                  "verify_passes": spec.verify_passes}
        return out

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "llamarun"}]}

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest) -> Any:
        body = await _parse(http, ChatBody)
        messages = [_message(m) for m in body.messages]
        try:
            tools = tooling.parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
            encode = _tool_encoder(engine, tools, messages)
        except tooling.ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        try:  # off the event loop: a long dialog takes a while to render and encode
            prompt = await asyncio.to_thread(encode, messages)
        except LlamarunError as e:
            raise APIError(400, str(e), param="messages") from None
        usage = http.scope.get(USAGE_KEY, {})
        usage["prompt"] = len(prompt)
        k = None
        if body.logprobs:
            k = _top_logprobs(body.top_logprobs, "top_logprobs")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        calling = tools if tools is not None and tools.choice != "none" else None
        if calling is not None and calling.choice != "auto":  # the call is constrained
            try:
                grammar = calling.grammar()
                constraint = await asyncio.to_thread(grammars.constraint, grammar)
            except (tooling.ToolError, structured.GrammarError) as e:
                raise APIError(400, str(e), param="tools") from None
        else:
            constraint = await _constraint(grammars, body.response_format)
        req = _request(engine, body, prompt, limit, k, max_tokens_default, defaults, constraint)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            # Submitted before the response starts: a full queue is an HTTP error, not a stream.
            return _sse(_chat_chunks(_submit(batcher, req, max_queue), req, rid, model_id, body, engine,
                                     usage, calling))
        events, result = await _collect(batcher, req, http, max_queue)
        usage["completion"] = result.completion_tokens
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        finish = _finish(result)
        calls = _calls(calling, result.text) if result.finish_reason == "stop" else []
        if calls:
            message = {"role": "assistant", "content": None,
                       "tool_calls": [c.openai() for c in calls]}
            finish = "tool_calls"
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                  "finish_reason": finish}
        if k is not None:
            choice["logprobs"] = {"content": [_chat_logprob(engine, t) for t in events
                                              if isinstance(t, Token)]}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "choices": [choice], "usage": _usage(result)}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        body = await _parse(http, CompletionBody)
        prompt_text, prompt = await asyncio.to_thread(_completion_prompt, engine, body.prompt)
        usage = http.scope.get(USAGE_KEY, {})
        usage["prompt"] = len(prompt)
        k = None if body.logprobs is None else _top_logprobs(body.logprobs, "logprobs", most=5)
        constraint = await _constraint(grammars, body.response_format)
        req = _request(engine, body, prompt, body.max_tokens, k, max_tokens_default, defaults,
                       constraint)
        rid = f"cmpl-{uuid.uuid4().hex}"
        echo = prompt_text if body.echo else ""
        if body.stream:
            return _sse(_completion_chunks(_submit(batcher, req, max_queue), req, rid, model_id, body, engine,
                                           echo, usage))
        events, result = await _collect(batcher, req, http, max_queue)
        usage["completion"] = result.completion_tokens
        choice: dict[str, Any] = {"index": 0, "text": echo + result.text, "logprobs": None,
                                  "finish_reason": _finish(result)}
        if k is not None:
            choice["logprobs"] = _completion_logprobs(engine, [t for t in events
                                                               if isinstance(t, Token)], len(echo))
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": model_id, "choices": [choice], "usage": _usage(result)}

    return app


def refuse_requests(app: FastAPI, reason: str) -> None:
    """Answer every later request with 503 and `reason`: the server can no longer serve and is
    stopping (`serve --tp` lost a rank). Safe to call from any thread."""
    app.state.refusing = reason


async def _serving(http: HTTPRequest) -> None:
    reason = http.app.state.refusing
    if reason is not None:
        raise APIError(503, reason, type="server_error", code="shutting_down")


# -- requests ----------------------------------------------------------------------------------

async def _parse(http: HTTPRequest, model: type[_BodyT]) -> _BodyT:
    """The request's JSON body as `model`, parsed off the event loop (a body may be 4 MiB)."""
    try:
        raw = await http.body()  # through RequestGuard: at most MAX_BODY_BYTES, in time
    except ClientDisconnect:  # gone before the body was in: nothing to answer, nothing to log
        raise APIError(499, "client disconnected") from None
    return await asyncio.to_thread(_validate, raw, model)


def _validate(raw: bytes, model: type[_BodyT]) -> _BodyT:
    try:
        data = _clean(json.loads(raw), 1)
    except (RecursionError, _TooDeep):
        raise APIError(400, f"the body is nested deeper than {MAX_JSON_DEPTH} levels",
                       code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        where = (f": {e.msg} at line {e.lineno} column {e.colno}"
                 if isinstance(e, json.JSONDecodeError) else ": it is not UTF-8")
        raise APIError(400, f"the body is not valid JSON{where}", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                       param=where or None) from None


class _TooDeep(Exception):
    pass


def _clean(value: Any, depth: int) -> Any:
    """`value` with lone surrogates in its strings (JSON "\\ud800": not Unicode, so not
    encodable) replaced by U+FFFD, as the tokenizers do; _TooDeep past MAX_JSON_DEPTH levels."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, (list, dict)) and depth > MAX_JSON_DEPTH:
        raise _TooDeep
    if isinstance(value, list):
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {valid_text(k): _clean(v, depth + 1) for k, v in value.items()}
    return value


def _message(m: ChatMessage) -> dict[str, Any]:
    """A request's message as the chat format takes it (a tool call's and a tool result's
    fields kept)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                           "content": _content(m.content)}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tool_encoder(engine: Engine, tools: tooling.Tools | None,
                  messages: list[dict[str, Any]]) -> Any:
    """How to encode the dialog: the model's chat format, or, when there are tools to offer or
    tool calls and results in the dialog, the format that renders them (ToolError if none)."""
    offered = tools is not None and tools.choice != "none"
    if not offered and not any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        return engine.chat_format.encode_dialog
    fmt = tooling.tool_format(engine.chat_format)
    listed = tools.for_template if offered and tools is not None else None
    return lambda ms: fmt.encode_dialog(tooling.template_messages(ms), tools=listed)


def _calls(tools: tooling.Tools | None, text: str) -> list[tooling.ToolCall]:
    """The tool calls a finished reply makes (one unless parallel calls are allowed)."""
    if tools is None:
        return []
    return tooling.reply_calls(text, tools.names, tools.parallel)


def _content(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _top_logprobs(k: int | None, name: str, most: int = MAX_TOP_LOGPROBS) -> int:
    k = 0 if k is None else k
    if not 0 <= k <= most:
        raise APIError(400, f"{name} must be between 0 and {most}, got {k}", param=name)
    return k


def _completion_prompt(engine: Engine, prompt: str | list[str] | list[int]) -> tuple[str, list[int]]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        ids = [int(p) for p in prompt]
        try:
            engine.check_ids(ids)
        except InvalidArgumentError as e:
            raise APIError(400, str(e), param="prompt") from None
        return engine.tokenizer.decode(ids), ids
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported (n=1)", param="prompt")
        prompt = prompt[0]
    assert isinstance(prompt, str)
    ids = engine.encode_prompt(prompt)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return prompt, ids


def response_grammar(response_format: dict[str, Any] | None) -> structured.Grammar | None:
    """The grammar OpenAI's `response_format` asks for: {"type": "text"} (none), {"type":
    "json_object"} (any JSON object) or {"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}, "strict": true}}; APIError 400 naming the field that is wrong (a keyword
    the schema uses that is not supported is named in the message)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return structured.json_object()
    if kind != "json_schema":
        raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', "
                            f"got {kind!r}", param="response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError(400, "response_format.json_schema must be an object with a 'schema'",
                       param="response_format.json_schema")
    if "schema" not in spec:
        raise APIError(400, "response_format.json_schema.schema is required",
                       param="response_format.json_schema.schema")
    where = "response_format.json_schema.schema"
    try:
        return structured.json_schema(spec["schema"], what=where)
    except structured.GrammarError as e:
        raise APIError(400, str(e), param=where) from None


async def _constraint(grammars: structured.GrammarCompiler,
                      response_format: dict[str, Any] | None) -> Constraint | None:
    """response_format as a constraint on the model's tokens, checked and compiled in a worker
    thread (the first one builds llguidance's view of the vocabulary, about a second)."""
    if response_format is None:
        return None

    def build() -> Constraint | None:
        grammar = response_grammar(response_format)
        if grammar is None:
            return None
        try:
            return grammars.constraint(grammar)
        except structured.GrammarError as e:
            raise APIError(400, str(e), param="response_format") from None

    return await asyncio.to_thread(build)


def _request(engine: Engine, body: _Body, prompt: list[int], max_tokens: int | None,
             top_logprobs: int | None, max_tokens_default: int,
             defaults: SamplingParams, constraint: Constraint | None = None) -> Request:
    if body.n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported (use repeat_penalty)", param=name)
    ctx = engine.max_seq_len
    if len(prompt) >= ctx:
        raise APIError(413, f"the prompt has {len(prompt)} tokens but the context holds {ctx}",
                       param="messages" if isinstance(body, ChatBody) else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(max_tokens_default, ctx - len(prompt))
    if not 1 <= max_tokens <= ctx:
        raise APIError(400, f"max_tokens must be between 1 and the context ({ctx}), got {max_tokens}",
                       param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(len(s) > 256 for s in stop):
        raise APIError(400, "stop takes at most 4 strings of at most 256 characters", param="stop")
    try:
        sampling = SamplingParams(
            temperature=_D(body.temperature, defaults.temperature),
            top_p=_D(body.top_p, defaults.top_p), top_k=_D(body.top_k, defaults.top_k),
            min_p=_D(body.min_p, defaults.min_p),
            repeat_penalty=_D(body.repeat_penalty, defaults.repeat_penalty),
            repeat_last_n=defaults.repeat_last_n, seed=body.seed)
    except InvalidArgumentError as e:
        raise APIError(400, str(e), param=str(e).split()[0]) from None
    return Request(prompt=prompt, sampling=sampling, max_new_tokens=max_tokens,
                   stop=tuple(stop), top_logprobs=top_logprobs, constraint=constraint)


def _D(value: Any, default: Any) -> Any:  # noqa: N802
    return default if value is None else value


def _finish(result: GenerationResult) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def _usage(result: GenerationResult) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.reused_tokens}}


# -- running a request -------------------------------------------------------------------------

def _submit(batcher: Scheduler, req: Request, max_queue: int) -> tuple[Ticket, asyncio.Queue[Event]]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    try:
        ticket = batcher.submit(req, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e),
                                max_queue=max_queue)
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
    except Stopped as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    return ticket, queue


async def _events(submitted: tuple[Ticket, asyncio.Queue[Event]]) -> AsyncIterator[Event]:
    """A submitted request's events up to its result; cancelled if the consumer goes away."""
    ticket, queue = submitted
    try:
        while True:
            event = await queue.get()
            if isinstance(event, Failed):
                if isinstance(event.error, Stopped):  # the server cannot go on (serve --tp)
                    raise APIError(503, event.message, type="server_error", code="shutting_down")
                raise APIError(500, event.message, type="server_error")
            yield event
            if isinstance(event, GenerationResult):
                return
    finally:
        ticket.cancel()  # a no-op once finished; frees the slot at once otherwise


async def _collect(batcher: Scheduler, req: Request,
                   http: HTTPRequest, max_queue: int) -> tuple[list[Event], GenerationResult]:
    """Run a request to its end, cancelling it if the client disconnects meanwhile."""
    events: list[Event] = []

    submitted = _submit(batcher, req, max_queue)

    async def run() -> GenerationResult:
        async for e in _events(submitted):
            if isinstance(e, GenerationResult):
                return e
            events.append(e)
        raise AssertionError("a request ended without a result")

    task = asyncio.ensure_future(run())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await http.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")
    return events, task.result()


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as e:  # after the 200 went out: the error is the stream's last event
            if e.status != 503:  # a server that stops says why itself, once
                log.warning("stream failed: %s", e.message)
            yield f"data: {json.dumps(e.content(), ensure_ascii=False)}\n\n"
            return
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(submitted: tuple[Ticket, asyncio.Queue[Event]], req: Request, rid: str,
                       model_id: str, body: ChatBody, engine: Engine,
                       usage: dict[str, int],
                       tools: tooling.Tools | None = None) -> AsyncIterator[dict[str, Any]]:
    """The chat stream. With tools on offer, a tool call goes out as it is generated (its id,
    type and name once the name is written, then its arguments' text as it comes, as
    `delta.tool_calls`) and the reply finishes with "tool_calls"; text that may still become a
    call is held back, and sent as content once it cannot (or at the end, if it was not one)."""
    created = int(time.time())
    calls = tooling.CallStream(tools.names, tools.parallel) if tools is not None else None

    def chunk(delta: dict[str, Any], finish: str | None = None,
              logprobs: Any = None) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    async for e in _events(submitted):
        if calls is not None and not calls.content and not isinstance(e, GenerationResult):
            text = e.chunk.text if isinstance(e, Token) else e.text if isinstance(e, TextChunk) else ""
            for delta in calls.feed(text):
                yield chunk({"tool_calls": [delta]})
            if not calls.content:
                continue
            e = TextChunk(calls.text, None)  # not a call: what was held goes out as content
        if isinstance(e, GenerationResult):
            usage["completion"] = e.completion_tokens
            finish = _finish(e)
            if calls is not None and not calls.content:  # still held, or calls
                for delta in calls.finish(e.finish_reason == "stop"):
                    yield chunk({"tool_calls": [delta]})
                if calls.calling:
                    finish = "tool_calls" if e.finish_reason == "stop" else finish
                elif calls.text:
                    yield chunk({"content": calls.text})
            yield chunk({}, finish)
            if (body.stream_options or {}).get("include_usage"):
                yield {"id": rid, "object": "chat.completion.chunk", "created": created,
                       "model": model_id, "choices": [], "usage": _usage(e)}
            return
        if isinstance(e, Token):
            lp = {"content": [_chat_logprob(engine, e)]} if req.top_logprobs is not None else None
            if e.chunk.text or lp is not None:
                yield chunk({"content": e.chunk.text}, logprobs=lp)
        elif isinstance(e, TextChunk) and e.text:
            yield chunk({"content": e.text})


async def _completion_chunks(submitted: tuple[Ticket, asyncio.Queue[Event]], req: Request,
                             rid: str, model_id: str, body: CompletionBody, engine: Engine,
                             echo: str, usage: dict[str, int]) -> AsyncIterator[dict[str, Any]]:
    created = int(time.time())

    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                             "finish_reason": finish}]}

    if echo:
        yield chunk(echo)
    offset = len(echo)
    async for e in _events(submitted):
        if isinstance(e, GenerationResult):
            usage["completion"] = e.completion_tokens
            yield chunk("", _finish(e))
            if (body.stream_options or {}).get("include_usage"):
                yield {"id": rid, "object": "text_completion", "created": created,
                       "model": model_id, "choices": [], "usage": _usage(e)}
            return
        if isinstance(e, Token):
            lp = (_completion_logprobs(engine, [e], offset)
                  if req.top_logprobs is not None else None)
            offset += len(e.chunk.text)
            if e.chunk.text or lp is not None:
                yield chunk(e.chunk.text, logprobs=lp)
        elif isinstance(e, TextChunk) and e.text:
            offset += len(e.text)
            yield chunk(e.text)


# -- log-probabilities -------------------------------------------------------------------------

def _token_text(engine: Engine, token_id: int) -> str:
    return engine.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _chat_logprob(engine: Engine, t: Token) -> dict[str, Any]:
    assert t.chunk.token_id is not None
    text = _token_text(engine, t.chunk.token_id)
    return {"token": text, "logprob": t.chunk.logprob,
            "bytes": list(engine.tokenizer.token_bytes(t.chunk.token_id)),
            "top_logprobs": [{"token": _token_text(engine, i), "logprob": lp,
                              "bytes": list(engine.tokenizer.token_bytes(i))} for i, lp in t.top]}


def _completion_logprobs(engine: Engine, tokens: list[Token], offset: int) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []}
    for t in tokens:
        assert t.chunk.token_id is not None
        out["tokens"].append(_token_text(engine, t.chunk.token_id))
        out["token_logprobs"].append(t.chunk.logprob)
        out["top_logprobs"].append({_token_text(engine, i): lp for i, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(t.chunk.text)
    return out


# -- running the server ------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); InvalidArgumentError if not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def make_server(app: FastAPI, *, limits: ConnectionLimits | None = None) -> Any:
    """A uvicorn server for `app`: run it with .run(sockets=[listen(...)]); on Ctrl-C or SIGTERM
    it stops taking requests, lets running ones finish (up to 30 s), then returns.

    `limits` bound how long a connection may wait without a request and how many one client
    address (and all of them) may hold (ConnectionLimits() by default).
    """
    import uvicorn

    protocol = guarded_protocol(limits or ConnectionLimits())
    # limit_concurrency stays off: it would answer 503 to every request once `total`
    # connections are open, idle ones included; the protocol's own bounds close idle ones.
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30, timeout_keep_alive=5)
    return uvicorn.Server(config)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
