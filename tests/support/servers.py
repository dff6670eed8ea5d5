"""Running the real sidecar app under uvicorn in a background thread, on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn

from tests.support.database import Database

SIDECAR_PASSWORD = "sidecar-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_app(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the sidecar app did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def sidecar_url(database: Database) -> str:
    """The database as the sms_sidecar role, given a login the way an operator would."""
    database.execute(f"alter role sms_sidecar with login password '{SIDECAR_PASSWORD}'")
    info = psycopg.conninfo.conninfo_to_dict(database.url)
    info.update(user="sms_sidecar", password=SIDECAR_PASSWORD)
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def http_ready(sidecar: SidecarProcess) -> bool:
    try:
        return httpx.get(sidecar.url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def port_open(sidecar: SidecarProcess) -> bool:
    try:
        socket.create_connection(("127.0.0.1", sidecar.port), timeout=1).close()
    except OSError:
        return False
    return True


class SidecarProcess:
    """`sms-sidecar serve` as a real child process, for crash and scale-out tests.

    `args` runs another subcommand ("{port}" in it becomes the port); `ready` says when it is up;
    `command` is what starts it (`python -m sidecar` unless given).
    """

    def __init__(
        self,
        env: dict[str, str],
        args: Sequence[str] = ("serve",),
        ready: Callable[[SidecarProcess], bool] = http_ready,
        command: Sequence[str] = (sys.executable, "-m", "sidecar"),
    ) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [arg.replace("{port}", str(self.port)) for arg in args]
        self.ready = ready
        self.command = list(command)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="sidecar-", suffix=".log", delete=False)

    def start(self, timeout: float = 20) -> SidecarProcess:
        self.process = subprocess.Popen(
            [*self.command, *self.args], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.process.returncode}:\n{self.output()}")
            if self.ready(self):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"sidecar not ready in {timeout} s:\n{self.output()}")

    def kill(self, sig: int = signal.SIGKILL, wait: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(wait)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
        self.log.close()
        os.unlink(self.log.name)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
