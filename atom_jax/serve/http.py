"""uvicorn's HTTP/1.1 protocol (h11) with a read deadline and a bounded shutdown.

uvicorn times out idle keep-alive connections but not a client that sends half a request:
headers or a body trickling in (or never finishing) hold a connection, and its handler, for
ever, and keep a graceful shutdown waiting. Here a request must arrive whole within
`read_timeout` seconds of its first byte (or of the connection opening); otherwise the
connection is closed. Time the server itself holds reading paused does not count against the
client: uvicorn pauses a connection whose buffered body (> 64 KiB) the app has not consumed
yet, so a big body sent at full speed to a busy server is the server's delay, not a slow
client. On shutdown, connections still receiving a request are closed at once instead of
being waited for.
"""

from __future__ import annotations

import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("atom_jax.serve")


class TimedH11Protocol(H11Protocol):
    read_timeout = 30.0  # seconds; set per server by `protocol_with_timeout`

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_deadline = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._receiving():
            if self._read_deadline is None:  # first bytes of the next request
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.cycle is not None and not self.cycle.response_started and self._receiving():
            self._close("still sending its request at shutdown")
            return
        super().shutdown()

    # ---- the deadline --------------------------------------------------------------------
    def _receiving(self) -> bool:
        """A request has started (or may) and has not fully arrived."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if getattr(self, "_read_deadline", None) is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _timed_out(self) -> None:
        self._read_deadline = None
        if self.flow.read_paused and not self.transport.is_closing():
            self._arm()  # the app is behind on this body: the client gets a new deadline
            return
        if self._receiving() and not self.transport.is_closing():
            self._close(f"sent no complete request within {self.read_timeout:g} s")

    def _close(self, why: str) -> None:
        client = "%s:%d" % self.client if self.client else "a client"
        log.warning("closing the connection of %s: it %s", client, why)
        self.transport.close()


def protocol_with_timeout(read_timeout: float) -> type[TimedH11Protocol]:
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout": float(read_timeout)})
