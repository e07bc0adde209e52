"""ASGI middleware that must run before FastAPI parses anything: the API key check (so a
request without a key gets 401, not a validation error) and the request body size limit."""

from __future__ import annotations

import hmac
import json

from atom_jax.serve.errors import error_body

# /health, /metrics and the docs stay open
PROTECTED_PREFIXES = ("/v1/", "/debug/", "/start_profile", "/stop_profile")


async def _send_error(send, status: int, message: str, code: str, headers=()) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyAuth:
    """`Authorization: Bearer <key>` on the API routes; 401 with OpenAI's body otherwise."""

    def __init__(self, app, api_key: str):
        self.app, self._expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self._expected):
                await _send_error(send, 401, "Incorrect or missing API key: send it as "
                                  "'Authorization: Bearer <key>'", "invalid_api_key",
                                  [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for request bodies over `max_bytes`. The body is read here in full (it is small by
    construction) and replayed to the app; later receive() calls go to the server, so the app
    still sees `http.disconnect`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header", "invalid_header")
                return
            if too_big:
                await self._reject(send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before sending the body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        await _send_error(send, 413, f"request body larger than {self.max_bytes} bytes",
                          "request_too_large")
