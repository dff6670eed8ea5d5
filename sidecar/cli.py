"""The `sms-sidecar` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sidecar.config import Config, ConfigError, check_database_url, is_placeholder
from sidecar.errors import CommandFailed, DatabaseUnavailable, SidecarError

__all__ = ["main"]


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise ConfigError("DATABASE_URL is not set (a PostgreSQL URL of your Supabase database)")
    check_database_url(url)
    return url


def _migrate(args: argparse.Namespace) -> int:
    import psycopg

    from sidecar.migrate import enable_sidecar_login, migrate

    url = _database_url()
    password = os.environ.get("SMS_SIDECAR_DB_PASSWORD", "")
    if is_placeholder(password):
        raise ConfigError(
            "SMS_SIDECAR_DB_PASSWORD is still the REPLACE_WITH_... placeholder from .env.example; "
            "set a real password in .env (e.g. openssl rand -hex 24)"
        )
    try:
        applied = migrate(url, args.dir)
        if password:
            enable_sidecar_login(url, password)
            print("sms_sidecar may log in with SMS_SIDECAR_DB_PASSWORD")
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {str(exc).strip()}") from None
    for migration in applied:
        print(f"applied {migration.path.name}")
    print(f"migrations up to date ({len(applied)} applied)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Into the environment, not a copy: the workers of --workers N read their configuration from it.
    if args.host:
        os.environ["HOST"] = args.host
    if args.port:
        os.environ["PORT"] = str(args.port)
    if args.workers is not None:
        os.environ["SMS_SIDECAR_WORKERS"] = str(args.workers)
    config = Config.from_env(os.environ)
    if config.grpc.port is not None:
        if config.workers > 1:  # each worker would bind GRPC_PORT, and all but one would fail to start
            raise ConfigError(
                "GRPC_PORT is served by one process only: with more than one worker, unset it "
                "and run `sms-sidecar grpc` beside `serve`"
            )
        _require_grpc()
    from sidecar.process import serve, serve_workers

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
        raise CommandFailed("sms-sidecar: gRPC is not installed: pip install 'supabase-aliyun-sms[grpc]'") from None


def _grpc(args: argparse.Namespace) -> int:
    _require_grpc()
    env = dict(os.environ)
    if args.host:
        env["HOST"] = args.host
    env["GRPC_PORT"] = str(args.port) if args.port else env.get("GRPC_PORT", "").strip() or "50511"
    config = Config.from_env(env)

    from sidecar.process import run_grpc

    run_grpc(config)
    return 0


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
    try:
        result: int = args.run(args)
    except SidecarError as exc:  # the one exit path of every error we raise on purpose: one line
        print(exc.line(args.command), file=sys.stderr)
        return exc.exit_code
    return result
