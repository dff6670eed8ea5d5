"""Bounds on slow and piled-up HTTP connections, which uvicorn leaves unbounded.

uvicorn has no timeout on a request's arrival: its keep-alive timer runs only between requests and
any byte cancels it, so a client sending its headers (or body) a byte at a time holds a connection
and its file descriptor forever. Its `limit_concurrency` does not help: the 503 is decided only once
a request's headers have arrived, and connections beyond the limit are still accepted and held.

`bounded` returns uvicorn's httptools protocol class, or its h11 one where httptools is not installed
(for `uvicorn.Config(http=...)`), extended to close a connection whose request has not fully arrived
within `request_timeout` seconds of the connection's opening or of the previous response (uvicorn's
5 s keep-alive still closes idle ones sooner), and to refuse connections beyond `max_connections` at
once. The app's own time is not bounded here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any, ClassVar, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidecar.config import Config

__all__ = ["HTTP", "bounded", "from_environment"]

log = logging.getLogger("sidecar.http")

try:  # uvicorn[standard] brings httptools; a platform without its wheel serves with h11
    import httptools  # noqa: F401
except ImportError:
    HTTP: Literal["httptools", "h11"] = "h11"
else:
    HTTP = "httptools"

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


class _Bounds:
    """The two bounds of one protocol class, and the connections they cut, shared by its connections."""

    def __init__(self, request_timeout: float, max_connections: int) -> None:
        self.request_timeout, self.max_connections = request_timeout, max_connections
        self.refused = _Throttled(f"refused connections beyond HTTP_MAX_CONNECTIONS={max_connections}")
        self.timed_out = _Throttled(f"closed connections whose request took over {request_timeout:g} s")

    def admit(self, transport: asyncio.Transport, open_connections: int) -> bool:
        if open_connections <= self.max_connections:
            return True
        # Closed before reading: a client whose request is already here may see a reset, not the 503.
        transport.write(_REFUSAL)
        transport.close()
        self.refused()
        return False


class _Deadline:
    """One timer per awaited request, from the moment it is awaited until it has fully arrived."""

    def __init__(self, bounds: _Bounds, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        self.bounds, self.loop, self.transport = bounds, loop, transport
        self.timer: asyncio.TimerHandle | None = None

    def track(self, awaited: bool) -> None:
        if not awaited or self.transport.is_closing():
            self.cancel()
        elif self.timer is None:
            self.timer = self.loop.call_later(self.bounds.request_timeout, self._expire)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        # abort, not close: a client that does not send may not read either, and close would wait for it.
        self.transport.abort()
        self.bounds.timed_out()


class _BoundedH11(H11Protocol):
    bounds: ClassVar[_Bounds]
    _deadline: _Deadline | None = None  # None: refused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # first, so that connection_lost finds its state
        if self.bounds.admit(transport, len(self.connections)):
            self._deadline = _Deadline(self.bounds, self.loop, transport)
            self._track()

    def handle_events(self) -> None:  # runs after every read, and when a keep-alive response ends
        super().handle_events()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._track(awaited=False)
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:  # the connection is no longer ours
        self._track(awaited=False)
        super().handle_websocket_upgrade(event)

    def _track(self, awaited: bool = True) -> None:
        if self._deadline is not None:
            self._deadline.track(awaited and self.conn.their_state in _AWAITED)


if HTTP == "httptools":
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _BoundedHttpTools(HttpToolsProtocol):
        """httptools parses whatever arrives, pipelined requests included, and reports it by callbacks.
        The client owes a request while every request that has fully arrived has been answered: during
        its first, after each response, also after an early one such as the hook's 408 (h11's IDLE and
        SEND_BODY). A pipelined request's time starts with the response before it, as with h11, which
        buffers it until then."""

        bounds: ClassVar[_Bounds]
        _deadline: _Deadline | None = None  # None: refused
        _arrived = 0  # requests fully received
        _answered = 0  # responses fully sent

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # first, so that connection_lost finds its state
            if self.bounds.admit(transport, len(self.connections)):
                self._deadline = _Deadline(self.bounds, self.loop, transport)
                self._track()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._arrived += 1
            self._track(awaited=False)  # in time; already answered (a 408): a fresh bound for the next one
            self._track()

        def on_response_complete(self) -> None:  # also for a pipelined one: its successor starts here
            self._answered += 1
            super().on_response_complete()
            self._track()

        def connection_lost(self, exc: Exception | None) -> None:
            self._track(awaited=False)
            super().connection_lost(exc)

        def handle_websocket_upgrade(self) -> None:  # the connection is no longer ours
            self._track(awaited=False)
            super().handle_websocket_upgrade()

        def _track(self, awaited: bool = True) -> None:
            if self._deadline is not None:
                self._deadline.track(awaited and self._answered >= self._arrived)


def bounded(request_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for `HTTP` whose connections get `request_timeout` seconds for each
    request to arrive (headers and body), and of which at most `max_connections` are open at once."""
    base: type[_BoundedH11 | _BoundedHttpTools] = _BoundedHttpTools if HTTP == "httptools" else _BoundedH11
    return type(base.__name__.lstrip("_"), (base,), {"bounds": _Bounds(request_timeout, max_connections)})


def from_environment(**kwargs: Any) -> asyncio.Protocol:
    """One connection's protocol, for `serve --workers N`: uvicorn gives each worker process an import
    string (`http="sidecar.slow_clients:from_environment"`), not a class, so the bounds come from the
    environment the process was started with, as `sidecar.app:from_environment` reads its config."""
    return _from_environment()(**kwargs)


@functools.cache
def _from_environment() -> type[asyncio.Protocol]:
    config = Config.from_env(os.environ)
    return bounded(config.http_request_timeout_seconds, config.http_max_connections)
