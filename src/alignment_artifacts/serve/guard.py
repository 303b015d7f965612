"""ASGI middleware run before routing: Host check, API key, and a body-size cap read as it streams in."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from .schemas import ApiError, ServerLimits


def _error_bytes(error: ApiError) -> bytes:
    return json.dumps(error.body()).encode()


def _host_name(header: str) -> str:
    """The Host header without its port ('[::1]:8000' -> '[::1]')."""
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware run before routing: Host check, API key, and a body-size cap read as it streams in."""

    def __init__(self, app: Any, api_key: str | None, limits: ServerLimits):
        self.app, self.api_key, self.limits = app, api_key, limits

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._check_headers(scope["path"], headers)
        if error is not None:
            await self._reject(send, error)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.limits.max_request_bytes:
                await self._reject(send, self._too_large())
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _check_headers(self, path: str, headers: dict[str, str]) -> ApiError | None:
        allowed = self.limits.allowed_hosts
        host = _host_name(headers.get("host", ""))
        if allowed is not None and host not in allowed:
            return ApiError(f"Host '{host}' is not served here (DNS-rebinding protection).", code="invalid_host")
        if self.api_key and path != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return ApiError("Incorrect or missing API key: send 'Authorization: Bearer KEY'.", status=401,
                                code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_request_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(f"The request body is larger than this server's limit of {self.limits.max_request_bytes} "
                        "bytes.", status=413, code="request_too_large")

    @staticmethod
    async def _reject(send: Callable[[Any], Awaitable[None]], error: ApiError) -> None:
        body = _error_bytes(error)
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


