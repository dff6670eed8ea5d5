"""What each long-running command starts and stops, and in which order (after uvicorn's Server.serve()).

- `serve`: uvicorn in this process; the app's lifespan holds the sidecar (sidecar/lifecycle.py:
  pool, provider, the gRPC server when GRPC_PORT is set, delivery worker), stopped in reverse on
  SIGTERM or SIGINT once uvicorn has finished the requests in flight.
- `serve --workers N`: uvicorn's supervisor and N such processes on one socket (no gRPC).
- `grpc`: the same sidecar without HTTP: the gRPC server and the delivery worker, until SIGTERM or SIGINT.
- `dev` (sidecar/dev.py): its throwaway database around `serve`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from sidecar.config import Config
from sidecar.logs import configure

__all__ = ["run_grpc", "serve", "serve_workers"]

# uvicorn's settings for one process and for N alike. ws="none": the app has no WebSocket route, so
# an upgrade request stays an HTTP request, under sidecar/slow_clients.py's bounds.
_UVICORN: dict[str, Any] = {"log_config": None, "access_log": False, "timeout_graceful_shutdown": 10,
                            "backlog": 1024, "ws": "none"}  # fmt: skip


def _loop() -> str:
    """uvloop where it installs (uvicorn[standard]; not on Windows), else asyncio's own loop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _open_files_for(config: Config) -> None:
    """Room for what a busy process holds: its HTTP connections, the provider's and the database's."""
    _open_files_limit(config.http_max_connections + config.max_in_flight + 256)


def _open_files_limit(needed: int) -> None:
    """Raise the soft limit on open files towards `needed`. Many hosts and containers start at 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _announce(config: Config, loop: str, workers: int) -> None:
    from sidecar.slow_clients import HTTP

    extra = {"address": f"{config.host}:{config.port}", "http": HTTP, "loop": loop, "workers": workers}
    logging.getLogger("sidecar").info("serving HTTP", extra=extra)


def serve(config: Config, on_started: Callable[[], None] | None = None) -> None:
    """The sidecar in this process (`config.workers` is not consulted: see serve_workers)."""
    import uvicorn

    from sidecar.app import create_app
    from sidecar.slow_clients import bounded

    configure()
    _open_files_for(config)
    _announce(config, loop := _loop(), workers=1)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), host=config.host, port=config.port, loop=loop,
            http=bounded(config.http_request_timeout_seconds, config.http_max_connections), **_UVICORN,
        )
    )  # fmt: skip
    if on_started is not None:

        def announce() -> None:  # once the port is open, so what it says works at once
            while not server.started and not server.should_exit:
                time.sleep(0.02)
            if server.started:
                on_started()

        threading.Thread(target=announce, daemon=True).start()
    server.run()


def serve_workers(config: Config) -> None:
    """`config.workers` processes accepting on one socket, under uvicorn's supervisor: it restarts a
    worker that dies, and on SIGTERM or SIGINT stops each gracefully (sends in flight finish, claimed
    messages are released). Each worker is the whole sidecar: pool, provider, delivery worker (the
    outbox claim skips locked rows, so they drain it together). uvicorn hands a worker import strings,
    not objects, so its app and its slow-client bounds read this process's environment (see cli._serve)."""
    import uvicorn

    configure()
    _open_files_for(config)  # the workers inherit it
    _announce(config, loop := _loop(), config.workers)
    uvicorn.run(
        "sidecar.app:from_environment", factory=True, workers=config.workers, host=config.host, port=config.port,
        loop=loop, http="sidecar.slow_clients:from_environment", **_UVICORN,
    )  # fmt: skip


def run_grpc(config: Config) -> None:
    """`sms-sidecar grpc`: the gRPC API and the delivery worker in one process, until SIGTERM or SIGINT."""
    configure()
    asyncio.run(_run_grpc(config))


async def _run_grpc(config: Config) -> None:
    from sidecar.grpc_api.server import grpc_service
    from sidecar.lifecycle import running

    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    async with running(config, services=[grpc_service(config.host, config.grpc.port)]):
        await shutdown.wait()
