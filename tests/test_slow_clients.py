"""Slow clients, over real sockets against `sms-sidecar serve`: a request must arrive within
HTTP_REQUEST_TIMEOUT_SECONDS, and a process holds at most HTTP_MAX_CONNECTIONS connections.

Every test runs against both protocols `serve` may use: httptools on uvloop (uvicorn[standard], as
installed) and h11 on asyncio (where those do not install; here hidden from the process).

The bounds are made small here so that the suite stays quick; the checks are only "closed within the
bound plus generous slack" and "refused at once rather than held", never performance figures.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sidecar.config import Config, ConfigError
from tests.support.database import Database
from tests.support.servers import SidecarProcess, sidecar_url

BOUND = 2.5  # HTTP_REQUEST_TIMEOUT_SECONDS; above the hook's own 2 s body timeout, so its 408 comes first
CAP = 20  # HTTP_MAX_CONNECTIONS
SLACK = 3.0
TRICKLE = 0.5  # seconds between two bytes of a slow client
# Never complete within a test: far more bytes than (BOUND + SLACK) / TRICKLE.
SLOW_HEADERS = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"s" * 200
BODY_HEADERS = (b"POST /hooks/send-sms HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"content-length: 500\r\n\r\n")  # fmt: skip


class SlowClients:
    """`count` connections that send `prefix` at once, then `trickled` one byte every TRICKLE
    seconds, noting when the server closes each (seconds since they were opened)."""

    def __init__(self, port: int, count: int, trickled: bytes = SLOW_HEADERS, prefix: bytes = b"") -> None:
        self.opened = time.monotonic()
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
        for sock in self.socks:
            if prefix:
                sock.sendall(prefix)
        self.trickled = trickled
        self.closed: dict[socket.socket, float] = {}
        self.received: dict[socket.socket, bytes] = {sock: b"" for sock in self.socks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)
        self._thread.start()

    def _open(self) -> list[socket.socket]:
        return [sock for sock in self.socks if sock not in self.closed]

    def _gone(self, sock: socket.socket) -> None:
        self.closed.setdefault(sock, time.monotonic() - self.opened)

    def _run(self) -> None:
        for position in range(len(self.trickled)):
            for sock in self._open():
                try:
                    sock.send(self.trickled[position : position + 1])
                except OSError:
                    self._gone(sock)
            pause_until = time.monotonic() + TRICKLE
            while (left := pause_until - time.monotonic()) > 0 and self._open() and not self._stop.is_set():
                readable, _, _ = select.select(self._open(), [], [], left)
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except OSError:  # reset
                        data = b""
                    if data:
                        self.received[sock] += data
                    else:
                        self._gone(sock)
            if self._stop.is_set() or not self._open():
                return

    def wait_closed(self, timeout: float) -> bool:
        """Whether the server has closed every one of them within `timeout` seconds of their opening."""
        while len(self.closed) < len(self.socks) and time.monotonic() - self.opened < timeout:
            time.sleep(0.05)
        return len(self.closed) == len(self.socks)

    def __enter__(self) -> SlowClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TRICKLE + 5)
        for sock in self.socks:
            sock.close()


@pytest.fixture(scope="module", params=["httptools", "h11"])
def sidecar(request: pytest.FixtureRequest, database: Database, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[SidecarProcess]:  # fmt: skip
    env = {
        "DATABASE_URL": sidecar_url(database),
        "SMS_PROVIDER": "console",
        "SMS_WORKER_ENABLED": "false",
        "HTTP_REQUEST_TIMEOUT_SECONDS": str(BOUND),
        "HTTP_MAX_CONNECTIONS": str(CAP),
    }
    expected = {"http": "httptools", "loop": "uvloop"}
    if request.param == "h11":  # modules that fail to import, ahead of the installed ones
        hidden = tmp_path_factory.mktemp("without-uvicorn-standard")
        for module in ("httptools", "uvloop"):
            (hidden / f"{module}.py").write_text("raise ImportError('hidden by tests/test_slow_clients.py')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
        expected = {"http": "h11", "loop": "asyncio"}
    with SidecarProcess(env) as process:
        lines = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
        (serving,) = [line for line in lines if line["message"] == "serving HTTP"]
        assert {key: serving[key] for key in expected} == expected  # the protocol under test is the one serving
        yield process


def health(sidecar: SidecarProcess) -> int | str:
    """/healthz from a fresh client: its status, "refused" (reset or closed), or "timeout"."""
    try:
        return httpx.get(sidecar.url + "/healthz", timeout=2).status_code
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "refused"


def test_trickled_headers_are_cut_off_at_the_bound(sidecar: SidecarProcess) -> None:
    with SlowClients(sidecar.port, 1) as slow:
        # Meanwhile a normal keep-alive client is served, on one connection for longer than the bound:
        # the bound is per request, not per connection.
        client = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=2)
        first: socket.socket | None = None
        try:
            while time.monotonic() - slow.opened < BOUND + 1:
                client.request("GET", "/healthz")
                response = client.getresponse()
                assert (response.status, response.read()) == (200, b'{"status":"ok"}')
                first = first or client.sock
                assert client.sock is first
                time.sleep(TRICKLE)
        finally:
            client.close()
        assert slow.wait_closed(BOUND + SLACK), "a client trickling its headers is still connected"
        (after,) = slow.closed.values()
        assert BOUND - 0.3 < after < BOUND + SLACK
        assert slow.received == {slow.socks[0]: b""}  # no half request reaches the app


def test_a_trickled_body_is_cut_off_the_same_way(sidecar: SidecarProcess) -> None:
    with SlowClients(sidecar.port, 1, trickled=b"{" + b" " * 400, prefix=BODY_HEADERS) as slow:
        assert slow.wait_closed(BOUND + SLACK), "a client trickling its body is still connected"
        (after,) = slow.closed.values()
        assert BOUND - 0.3 < after < BOUND + SLACK
        # The hook's own body timeout answered first; the bound then frees the connection.
        assert slow.received[slow.socks[0]].startswith(b"HTTP/1.1 408 ")


HEALTH = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    ("prefix", "trickled"),
    [(HEALTH, SLOW_HEADERS), (HEALTH + BODY_HEADERS, b"{" + b" " * 400)],
    ids=["next-request-after-a-response", "pipelined-body"],
)
def test_the_next_request_gets_the_same_bound(sidecar: SidecarProcess, prefix: bytes, trickled: bytes) -> None:
    # A kept-alive connection owes its next request within the bound of the previous response; any
    # byte would restart uvicorn's own keep-alive timer. Pipelined, the next request's bytes may
    # already be parsed (httptools) or buffered (h11) while the first is answered.
    with SlowClients(sidecar.port, 1, trickled=trickled, prefix=prefix) as slow:
        assert slow.wait_closed(BOUND + SLACK), "a client trickling its second request is still connected"
        (after,) = slow.closed.values()
        assert BOUND - 0.3 < after < BOUND + SLACK
        assert slow.received[slow.socks[0]].startswith(b"HTTP/1.1 200 ")


def test_health_stays_answerable_while_slow_clients_are_held(sidecar: SidecarProcess) -> None:
    with SlowClients(sidecar.port, CAP - 3) as slow:
        time.sleep(TRICKLE)
        assert [health(sidecar) for _ in range(3)] == [200] * 3  # below the cap: answered
        with SlowClients(sidecar.port, 10) as beyond:  # now beyond the cap
            assert health(sidecar) in (200, 503, "refused")  # promptly, either way: never a timeout
            assert slow.wait_closed(BOUND + SLACK) and beyond.wait_closed(BOUND + SLACK)
    assert health(sidecar) == 200


def test_connections_beyond_the_cap_are_refused_at_once(sidecar: SidecarProcess) -> None:
    with SlowClients(sidecar.port, CAP + 10) as slow:
        time.sleep(1.0)  # well within BOUND: nothing has timed out yet
        refused = {sock: slow.received[sock] for sock in slow.closed}
        assert len(refused) >= 10, f"only {len(refused)} of {CAP + 10} connections were refused"
        assert all(data == b"" or data.startswith(b"HTTP/1.1 503 ") for data in refused.values()), refused
        assert health(sidecar) in (503, "refused")
        assert slow.wait_closed(BOUND + SLACK)
    assert health(sidecar) == 200


@pytest.mark.parametrize(
    ("name", "value"),
    [("HTTP_REQUEST_TIMEOUT_SECONDS", "0"), ("HTTP_REQUEST_TIMEOUT_SECONDS", "soon"), ("HTTP_MAX_CONNECTIONS", "0"),
     ("HTTP_MAX_CONNECTIONS", "1.5")],
)  # fmt: skip
def test_the_bounds_are_checked(name: str, value: str) -> None:
    env = {"DATABASE_URL": "postgresql:///x", "SMS_PROVIDER": "console"}
    config = Config.from_env(env)
    assert (config.http_request_timeout_seconds, config.http_max_connections) == (10.0, 500)
    with pytest.raises(ConfigError, match=f"^{name} "):
        Config.from_env(env | {name: value})
