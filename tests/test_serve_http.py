"""serve/http.py's read deadline on a real uvicorn server in this process (no model): a slow
client is cut off, a fast client whose body the app is slow to read is not."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from atom_jax.serve.http import protocol_with_timeout

READ_TIMEOUT = 0.3
APP_DELAY = 4 * READ_TIMEOUT  # the app waits this long before it reads a body


async def slow_reader(scope, receive, send):
    """Echoes the body's length, but only starts reading it after APP_DELAY (a busy server)."""
    if scope["type"] == "lifespan":
        while (msg := await receive())["type"] != "lifespan.shutdown":
            await send({"type": msg["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await asyncio.sleep(APP_DELAY)
    size, more = 0, True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        size += len(msg.get("body", b""))
        more = msg.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def address():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(slow_reader, http=protocol_with_timeout(READ_TIMEOUT), log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(10)


def _request(body_len: int) -> bytes:
    return (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {body_len}\r\n\r\n").encode()


def _response(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
        if b"\r\n\r\n" in out:
            head, _, rest = out.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) >= length:
                return out
    return out


def test_a_big_body_the_app_reads_late_is_not_cut_off(address):
    """1 MiB sent at once: uvicorn pauses reading at 64 KiB until the app reads (after 4x the
    read timeout); the paused time is the server's, so the request completes."""
    body = b"x" * (1 << 20)
    with socket.create_connection(address) as sock:
        sock.settimeout(30)
        sender = threading.Thread(target=sock.sendall, args=(_request(len(body)) + body,))
        sender.start()
        reply = _response(sock)
        sender.join(30)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert reply.endswith(str(len(body)).encode())


def test_a_client_that_stalls_mid_body_is_closed(address):
    """Half a small body, then nothing: the buffer never fills, so reading is never paused and
    the deadline closes the connection."""
    with socket.create_connection(address) as sock:
        sock.settimeout(30)
        t0 = time.monotonic()
        sock.sendall(_request(100) + b"x" * 50)
        try:
            assert sock.recv(65536) == b""
        except ConnectionResetError:
            pass
        took = time.monotonic() - t0
    assert READ_TIMEOUT * 0.9 < took < 10 * READ_TIMEOUT + 2, took
