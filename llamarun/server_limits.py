"""What keeps one client of the HTTP server from taking it from the others (see llamarun.server).

Two layers:

- `RequestGuard`, ASGI middleware around the application: the API key is checked before the
  body is read; the body is read at most to `max_body_bytes`, however it is framed (413 as soon
  as it passes), and must arrive within `body_timeout` seconds of the request head (408); an
  exception no handler took becomes a JSON 500; each request ends in one log line on the
  `llamarun.access` logger (INFO).
- `guarded_protocol(limits)`, uvicorn's h11 protocol with connection limits: a request head must
  arrive within `header_timeout` seconds of connecting (or of the last response), else the
  connection is closed; one client address holds at most `per_client` connections and the
  server `total`: past either, the oldest idle connection (no request running) is closed to make
  room, and if none is idle the new one is answered 503. A client still sending a body that will
  not be read gets its answer, then the connection closes (after at most `linger` seconds, so the
  client reads the answer instead of a reset).

Every refusal has OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response

from llamarun.errors import InvalidArgumentError

log = logging.getLogger(__name__)
access = logging.getLogger("llamarun.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

USAGE_KEY = "llamarun.usage"  # scope key: a dict the endpoints fill with token counts


class APIError(HTTPException):
    """An error answered in OpenAI's shape (an HTTPException, so FastAPI passes it on as it is)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail=message, headers=headers)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def content(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def body(self) -> bytes:
        # "replace": text that is not Unicode (a lone surrogate) must not turn an error into a 500.
        return json.dumps(self.content(), ensure_ascii=False).encode("utf-8", "replace")

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def check_api_key(key: str) -> bytes:
    """The key as the bytes a client sends; InvalidArgumentError unless it is printable ASCII
    (HTTP header values are ASCII to most clients) with no space at either end."""
    if not key.strip():
        raise InvalidArgumentError("--api-key must not be empty")
    if not key.isascii() or not key.isprintable():
        raise InvalidArgumentError("--api-key must be printable ASCII (clients send it in an HTTP "
                                   "header, which most of them cannot do with other characters)")
    if key != key.strip():
        raise InvalidArgumentError("--api-key must not begin or end with a space (HTTP drops it)")
    return key.encode("ascii")


# -- requests ----------------------------------------------------------------------------------

class RequestGuard:
    """ASGI middleware: key, body size and time limits, a JSON 500, and the access log line."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 body_timeout: float) -> None:
        self.app = app
        self.key = None if api_key is None else check_api_key(api_key)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                type="authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                        code="body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        usage: dict[str, int] = {}
        scope[USAGE_KEY] = usage
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_status)
                return
            await self.app(scope, self._body_reader(receive), send_status)
        except APIError as e:  # raised by the body reader outside any handler
            if not status:
                await e.response()(scope, receive, send_status)
        except Exception:  # noqa: BLE001 (any bug: logged once, answered in the API's shape)
            log.exception("%s %s failed", scope.get("method"), _printable(scope["path"]))
            if not status:
                await APIError(500, "internal server error", type="server_error").response()(
                    scope, receive, send_status)
        finally:
            access.info(_access_line(scope, status, usage, time.perf_counter() - start))

    def _body_reader(self, receive: Receive) -> Receive:
        """`receive` that stops at the size limit (413) and the body's deadline (408)."""
        deadline = time.monotonic() + self.body_timeout
        total = 0
        done = False

        async def reader() -> Message:
            nonlocal total, done
            if done:  # the body is in: what follows (a disconnect) may take as long as it likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within "
                                    f"{self.body_timeout:g} s", code="body_timeout") from None
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_body_bytes:
                    raise self._too_large()
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return reader


def _printable(text: str, limit: int = 200) -> str:
    """`text` for a log line: no control characters (a path can carry %1b), at most `limit`."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])
    return out + "..." if len(text) > limit else out


def _access_line(scope: Scope, status: int, usage: dict[str, int], seconds: float) -> str:
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    tokens = (f" prompt={usage.get('prompt', '-')} completion={usage.get('completion', '-')}"
              if usage else "")
    return (f'{who} "{scope.get("method", "-")} {_printable(scope["path"])}" {status or "-"}'
            f"{tokens} {seconds:.3f}s")


# -- connections -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConnectionLimits:
    """How long a connection may sit without a request, and how many one client may hold."""

    header_timeout: float = 10.0  # s from connecting (or the last response) to a whole request head
    per_client: int = 128  # connections from one address
    total: int = 1024  # connections in all
    linger: float = 2.0  # s a connection stays open after refusing a body still on its way


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with `limits` (one set of counts per call: one per server)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    held: dict[Any, None] = {}  # open connections, oldest first
    by_client: dict[str, dict[Any, None]] = {}

    def idle(p: Any) -> bool:
        return p.cycle is None or p.cycle.response_complete

    def forget(p: Any) -> None:
        held.pop(p, None)
        mine = by_client.get(p.host)
        if mine is not None:
            mine.pop(p, None)
            if not mine:
                del by_client[p.host]

    def admit(p: Any) -> str | None:
        """Make room for `p`, closing the oldest idle connection if a bound is reached; else
        say why there is none."""
        mine = by_client.get(p.host, {})
        if len(mine) >= limits.per_client:
            crowd, why = mine, "too many connections from this address"
        elif len(held) >= limits.total:
            crowd, why = held, "too many connections"
        else:
            crowd, why = {}, ""
        if crowd:
            victim = next((q for q in crowd if idle(q)), None)
            if victim is None:
                return why
            forget(victim)
            victim.transport.close()
        held[p] = None
        by_client.setdefault(p.host, {})[p] = None
        return None

    class GuardedH11Protocol(H11Protocol):
        host = ""
        _head_timer: asyncio.TimerHandle | None = None
        _draining = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.host = self.client[0] if self.client else ""
            why = admit(self)
            if why is not None:
                self._answer(APIError(503, f"{why}: try again when one is free",
                                      type="server_error", code="too_many_connections"))
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            forget(self)
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._draining:  # else: the rest of a refused body, dropped unread
                super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if not idle(self):  # a request head came: the app's limits take over
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:
                # Answered before its body was read (401, 413, 408): read no more of it, and
                # close once the client has had time to read the answer.
                self._draining = True
                self._unset_keepalive_if_required()
                if self.transport.can_write_eof():
                    self.transport.write_eof()
                self._disarm()
                self._head_timer = self.loop.call_later(limits.linger, self.transport.close)
            elif idle(self):
                self._arm()

        def send_400_response(self, msg: str) -> None:  # malformed HTTP: JSON like the rest
            if self.cycle is not None and self.cycle.response_started \
                    and not self.cycle.response_complete:  # (a bad chunk) mid-answer: just close
                self.transport.close()
                return
            self._answer(APIError(400, f"invalid HTTP request: {msg}", code="invalid_http"))

        def _answer(self, error: APIError) -> None:
            body = error.body()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (error.status, _PHRASES.get(error.status, b""),
                                                  len(body), body))
            self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if idle(self) and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


_PHRASES = {400: b"Bad Request", 503: b"Service Unavailable"}
