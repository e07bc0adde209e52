"""Server-sent events with client-disconnect detection, for both response kinds.

A client that goes away must abort its request at once (freeing its slot and KV pages), not
when the next token happens to fail to send: the stream watches ASGI `http.disconnect`
concurrently with sending, and non-streaming handlers race the result against it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse


async def wait_for_disconnect(receive) -> None:
    """Return when the client has disconnected (the request body was already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(StreamingResponse):
    """Sends `events` (already formatted `data: ...\\n\\n` strings) as text/event-stream.
    `on_abandon()` runs if the stream did not reach its end (disconnect, send error, cancel)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_abandon: Callable[[], None]):
        super().__init__(events, status_code=200, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_abandon = events, on_abandon  # (no Content-Length: streamed)

    async def __call__(self, scope, receive, send) -> None:
        completed = False
        try:
            async with anyio.create_task_group() as tg:
                async def watch():
                    await wait_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk.encode("utf-8"),
                                "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                completed = True
                tg.cancel_scope.cancel()  # stop the watcher
        except OSError:  # the client went away mid-send (ASGI spec 2.4 servers raise this)
            pass
        finally:
            if not completed:
                self.on_abandon()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def result_or_disconnect(result: asyncio.Future, request: Request):
    """Await `result` unless the client disconnects first; then return None (result cancelled)."""
    gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        return result.result()
    result.cancel()
    return None
