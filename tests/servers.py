"""Running the real sidecar app under uvicorn in a background thread, on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import uvicorn
from conftest import Database

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
