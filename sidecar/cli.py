"""The `sms-sidecar` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sidecar.config import Config, ConfigError, check_database_url, is_placeholder

__all__ = ["main"]


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise SystemExit("sms-sidecar: DATABASE_URL is not set (a PostgreSQL URL of your Supabase database)")
    try:
        check_database_url(url)
    except ConfigError as exc:
        raise SystemExit(f"sms-sidecar: {exc}") from None
    return url


def _migrate(args: argparse.Namespace) -> int:
    import psycopg

    from sidecar.migrate import MigrationError, enable_sidecar_login, migrate

    url = _database_url()
    password = os.environ.get("SMS_SIDECAR_DB_PASSWORD", "")
    if is_placeholder(password):
        raise SystemExit(
            "sms-sidecar: SMS_SIDECAR_DB_PASSWORD is still the REPLACE_WITH_... placeholder from .env.example; "
            "set a real password in .env (e.g. openssl rand -hex 24)"
        )
    try:
        applied = migrate(url, args.dir)
        if password:
            enable_sidecar_login(url, password)
            print("sms_sidecar may log in with SMS_SIDECAR_DB_PASSWORD")
    except MigrationError as exc:
        print(f"sms-sidecar migrate: failed in {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"sms-sidecar migrate: cannot reach the database: {str(exc).strip()}", file=sys.stderr)
        return 1
    for migration in applied:
        print(f"applied {migration.path.name}")
    print(f"migrations up to date ({len(applied)} applied)")
    return 0


def _config(env: Mapping[str, str]) -> Config:
    try:
        return Config.from_env(env)
    except ConfigError as exc:
        raise SystemExit(f"sms-sidecar: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    # Into the environment, not a copy: the workers of --workers N read their configuration from it.
    if args.host:
        os.environ["HOST"] = args.host
    if args.port:
        os.environ["PORT"] = str(args.port)
    if args.workers is not None:
        os.environ["SMS_SIDECAR_WORKERS"] = str(args.workers)
    config = _config(os.environ)
    if config.grpc.port is not None:
        if config.workers > 1:  # each worker would bind GRPC_PORT, and all but one would fail to start
            raise SystemExit(
                "sms-sidecar: GRPC_PORT is served by one process only: with more than one worker, unset it "
                "and run `sms-sidecar grpc` beside `serve`"
            )
        _require_grpc()
    if config.workers > 1:
        serve_workers(config)
    else:
        serve(config)
    return 0


def _require_grpc() -> None:
    """gRPC is an extra: without it, say how to install it rather than print a traceback."""
    try:
        importlib.import_module("sidecar.grpc_api.server")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ("grpc", "grpc_health", "grpc_reflection", "google"):
            raise
        raise SystemExit("sms-sidecar: gRPC is not installed: pip install 'supabase-aliyun-sms[grpc]'") from None


def _grpc(args: argparse.Namespace) -> int:
    _require_grpc()
    env = dict(os.environ)
    if args.host:
        env["HOST"] = args.host
    env["GRPC_PORT"] = str(args.port) if args.port else env.get("GRPC_PORT", "").strip() or "50511"
    config = _config(env)

    from sidecar.grpc_api.server import run

    run(config)
    return 0


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


def _announce(config: Config, loop: str, workers: int) -> None:
    from sidecar.slow_clients import HTTP

    extra = {"address": f"{config.host}:{config.port}", "http": HTTP, "loop": loop, "workers": workers}
    logging.getLogger("sidecar").info("serving HTTP", extra=extra)


def serve(config: Config, on_started: Callable[[], None] | None = None) -> None:
    """The sidecar in this process (`config.workers` is not consulted: see serve_workers)."""
    import uvicorn

    from sidecar.app import create_app
    from sidecar.logs import configure
    from sidecar.slow_clients import bounded

    configure()
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
    not objects, so its app and its slow-client bounds read this process's environment (see _serve)."""
    import uvicorn

    from sidecar.logs import configure

    configure()
    _announce(config, loop := _loop(), config.workers)
    uvicorn.run(
        "sidecar.app:from_environment", factory=True, workers=config.workers, host=config.host, port=config.port,
        loop=loop, http="sidecar.slow_clients:from_environment", **_UVICORN,
    )  # fmt: skip


def _dev(args: argparse.Namespace) -> int:
    from sidecar.dev import run_dev

    return run_dev()


def _check(args: argparse.Namespace) -> int:
    from sidecar.check import run_checks

    return run_checks()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sms-sidecar",
        description="Phone verification for Supabase through Alibaba Cloud SMS.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the hook endpoint, health, metrics and the delivery worker")
    serve.add_argument("--host", help="listen address (default: $HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: $PORT or 8090)")
    serve.add_argument("--workers", type=int, help="processes sharing the port, each the whole sidecar "
                       "(default: $SMS_SIDECAR_WORKERS or 1)")  # fmt: skip
    serve.set_defaults(run=_serve)

    grpc_parser = commands.add_parser(
        "grpc", help="run the phone-number gRPC service (SendSMS, Valid) and the delivery worker"
    )
    grpc_parser.add_argument("--host", help="listen address (default: $HOST or 127.0.0.1)")
    grpc_parser.add_argument("--port", type=int, help="listen port (default: $GRPC_PORT or 50511)")
    grpc_parser.set_defaults(run=_grpc)

    dev = commands.add_parser("dev", help="run everything locally: throwaway Postgres, console provider, examples")
    dev.set_defaults(run=_dev)

    check = commands.add_parser("check", help="check configuration, database, migrations, grants and Aliyun")
    check.set_defaults(run=_check)

    migrate = commands.add_parser("migrate", help="apply pending SQL migrations to DATABASE_URL")
    migrate.add_argument("--dir", type=Path, default=None, help="migrations folder (default: the bundled ones)")
    migrate.set_defaults(run=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result
