"""Bounds on slow and piled-up HTTP connections, which uvicorn leaves unbounded.

uvicorn has no timeout on a request's arrival: its keep-alive timer runs only between requests and
any byte cancels it, so a client sending its headers (or body) a byte at a time holds a connection
and its file descriptor forever. Its `limit_concurrency` does not help: the 503 is decided only once
a request's headers have arrived, and connections beyond the limit are still accepted and held.

`bounded_h11` returns an h11 protocol class (for `uvicorn.Config(http=...)`) that closes a connection
whose request has not fully arrived within `request_timeout` seconds of the connection's opening or
of the previous response (uvicorn's 5 s keep-alive still closes idle ones sooner), and refuses
connections beyond `max_connections` at once. The app's own time is not bounded here. It pins h11
even where uvicorn would pick httptools, so that one implementation carries the bounds.
"""

from __future__ import annotations

import asyncio
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["bounded_h11"]

log = logging.getLogger("sidecar.http")

_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: 20\r\nconnection: close\r\n\r\ntoo many connections")  # fmt: skip
# The client owes us a request (IDLE: not begun, before the first or after a response) or its body.
# Anything else is our turn (the app runs unbounded by this), an error, or a closing connection.
_AWAITED = (h11.IDLE, h11.SEND_BODY)


class _Throttled:
    """One warning per `every` seconds at most, with how many events it stands for: an attacker
    must not be able to flood the logs with one line per connection."""

    def __init__(self, message: str, every: float = 10.0) -> None:
        self.message, self.every = message, every
        self.count, self.last = 0, -every

    def __call__(self) -> None:
        self.count += 1
        if (now := time.monotonic()) - self.last >= self.every:
            log.warning(self.message, extra={"connections": self.count})
            self.count, self.last = 0, now


class _BoundedH11(H11Protocol):
    request_timeout: float
    max_connections: int
    refused: _Throttled
    timed_out: _Throttled
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # first, so that connection_lost finds its state
        if len(self.connections) > self.max_connections:
            # Closed before reading: a client whose request is already here may see a reset, not the 503.
            transport.write(_REFUSAL)
            transport.close()
            self.refused()
            return
        self._track()

    def handle_events(self) -> None:  # runs after every read, and when a keep-alive response ends
        super().handle_events()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:  # the connection is no longer ours
        self._cancel()
        super().handle_websocket_upgrade(event)

    def _track(self) -> None:
        """One timer per awaited request, from the moment it is awaited until it has fully arrived."""
        if self.conn.their_state not in _AWAITED or self.transport.is_closing():
            self._cancel()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._expire)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        # abort, not close: a client that does not send may not read either, and close would wait for it.
        self.transport.abort()
        self.timed_out()


def bounded_h11(request_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An h11 protocol class whose connections get `request_timeout` seconds for each request to
    arrive (headers and body), and of which at most `max_connections` are open at once."""

    class BoundedH11Protocol(_BoundedH11):
        pass

    BoundedH11Protocol.request_timeout = request_timeout
    BoundedH11Protocol.max_connections = max_connections
    BoundedH11Protocol.refused = _Throttled(f"refused connections beyond HTTP_MAX_CONNECTIONS={max_connections}")
    BoundedH11Protocol.timed_out = _Throttled(f"closed connections whose request took over {request_timeout:g} s")
    return BoundedH11Protocol
