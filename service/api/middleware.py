"""ASGI middleware: request body size limit (413), control characters refused (422), request latency metrics."""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import unquote

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _problem_bytes(status: int, title: str, detail: str) -> bytes:
    return json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()


class BodySizeLimitMiddleware:
    """Refuses request bodies above a byte limit, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._reject(send)
                return
        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not started:
                await self._reject(send)
        if too_large and not started:
            return

    async def _reject(self, send: Send) -> None:
        detail = f"request body exceeds the limit of {self.max_body_bytes} bytes"
        await _reject(send, 413, "Content Too Large", detail)


class _BodyTooLargeError(Exception):
    pass


class RequestMetricsMiddleware:
    """Observes request latency per route template, method and status."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(scope.get("method", ""), path, str(status)).observe(time.perf_counter() - started)


# C0 control characters and DEL: no name, id or label needs them, and PostgreSQL text cannot hold NUL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _control_path(value: Any, path: str) -> str | None:
    """The JSON path of the first string (key or value) holding a control character, or None."""
    if isinstance(value, str):
        return path if _CONTROL.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if _CONTROL.search(str(key)):
                return here
            found = _control_path(item, here)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _control_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


class ControlCharacterMiddleware:
    """Refuses control characters in the path, the query and every string of a JSON body with a 422 problem."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = unquote(scope.get("path", "")) + unquote(scope.get("query_string", b"").decode("latin-1"))
        if _CONTROL.search(target):
            await _reject(send, 422, "Unprocessable Content", "the URL holds a control character")
            return
        is_json = any(name == b"content-type" and b"json" in value.lower() for name, value in scope.get("headers", []))
        if not is_json or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            document = None  # the app answers malformed JSON itself
        where = _control_path(document, "")
        if where is not None:
            await _reject(send, 422, "Unprocessable Content", f"{where or 'the body'} holds a control character")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reject(send: Send, status: int, title: str, detail: str) -> None:
    body = _problem_bytes(status, title, detail)
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
