"""The ASGI layer in front of the app: the bearer token, the request-body limit, and per-request metrics.

It is plain ASGI (no framework), so a refused request is answered before FastAPI reads a byte of
its body: a body over the limit gets 413 as soon as its ``Content-Length`` says so, or as soon as
the bytes received pass the limit (a chunked upload); a request without the token gets 401.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from clipret.artifacts.atomic import human_bytes
from clipret.serve.metrics import ServeMetrics

__all__ = ["OPEN_PATHS", "Guard", "error_body"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Served without the token: the liveness and readiness probes, the (static) page and the API docs.
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


def error_body(kind: str, detail: str) -> dict[str, str]:
    """What every refused request's JSON body holds: ``{"kind": ..., "detail": one line}``."""
    return {"kind": kind, "detail": detail}


async def _reply(send: Send, status: int, kind: str, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(kind, detail)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    if status == 413:
        head.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wrap an ASGI ``app``: token check (when ``token``), body limit (``max_body`` bytes), metrics."""

    def __init__(self, app: Any, *, max_body: int, token: str | None, metrics: ServeMetrics) -> None:
        self.app, self.max_body, self.metrics = app, int(max_body), metrics
        self._token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def watch(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self._guarded(scope, receive, watch)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe(scope.get("path", ""), status[0], time.perf_counter() - start)

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None or scope.get("path") in OPEN_PATHS:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self._token)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._authorized(scope):
            self.metrics.error("unauthorized")
            await _reply(send, 401, "unauthorized", "this server needs a token: send the header 'Authorization: Bearer TOKEN'",
                         [(b"www-authenticate", b"Bearer")])
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = f"the request body is over the server's limit of {human_bytes(self.max_body)} (--max-upload)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                self.metrics.error("bad_request")
                await _reply(send, 400, "bad_request", "the Content-Length header is not a number")
                return
            if int(length) > self.max_body:
                self.metrics.error("too_large")
                await _reply(send, 413, "too_large", limit)
                return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_body:
                self.metrics.error("too_large")
                await _reply(send, 413, "too_large", limit)
                return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the whole buffered body once, then defers to the real one (disconnects)."""
    given = [False]

    async def again() -> MutableMapping[str, Any]:
        if not given[0]:
            given[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
