"""ASGI middleware that must run before FastAPI parses anything: the Host / Origin check
(DNS-rebinding defence), the API key check (so a request without a key gets 401, not a
validation error) and the request body size limit."""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import urlsplit

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


LOCAL_NAMES = ("localhost", "localhost.localdomain")


class AllowedHosts:
    """Which Host (and Origin) names a request may carry. Default: the bind address, the
    localhost names and any literal IP address (an IP cannot be rebound by DNS); other names
    only when listed (--allowed-hosts; "*" allows any). A web page on another site can then
    neither reach a local server through a rebound name nor send it requests from its origin."""

    def __init__(self, bind_host: str, extra: tuple[str, ...] = ()):
        self.any = "*" in extra
        self.names = {n.lower().rstrip(".") for n in (bind_host, *LOCAL_NAMES, *extra) if n}

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        host = host.lower().rstrip(".")
        if host in self.names or host.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(host.strip("[]"))
            return True
        except ValueError:
            return False


def _hostname(authority: str) -> str:
    """ "name:port" / "[::1]:port" / "name" -> the host part."""
    if authority.startswith("["):
        return authority[: authority.find("]") + 1] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


class HostCheck:
    """400 for a Host header, and 403 for an Origin header, that `allowed` refuses."""

    def __init__(self, app, allowed: AllowedHosts):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.allowed.any:
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            if not self.allowed.allows(_hostname(host)):
                await _send_error(send, 400, f"Host {host!r} is not allowed: use the server's "
                                  "address, or start it with --allowed-hosts", "invalid_host")
                return
            origin = headers.get(b"origin", b"").decode("latin-1")
            if origin and origin != "null" and not self.allowed.allows(urlsplit(origin).hostname or ""):
                await _send_error(send, 403, f"requests from origin {origin!r} are not allowed "
                                  "(start the server with --allowed-hosts to allow it)", "invalid_origin")
                return
        await self.app(scope, receive, send)
