"""The `sms-sidecar` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise SystemExit("sms-sidecar: DATABASE_URL is not set (a PostgreSQL URL of your Supabase database)")
    return url


def _migrate(args: argparse.Namespace) -> int:
    import psycopg

    from sidecar.migrate import MigrationError, migrate

    try:
        applied = migrate(_database_url(), args.dir)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sms-sidecar",
        description="Phone verification for Supabase through Alibaba Cloud SMS.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="apply pending SQL migrations to DATABASE_URL")
    migrate.add_argument("--dir", type=Path, default=None, help="migrations folder (default: the bundled ones)")
    migrate.set_defaults(run=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result
