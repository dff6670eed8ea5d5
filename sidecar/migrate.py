"""`sms-sidecar migrate`: apply the bundled SQL migrations.

Applied versions are recorded in `sms.schema_migrations`, never in the Supabase CLI's
`supabase_migrations.schema_migrations`: a version there that is missing from a user's own
`supabase/migrations/` folder makes their next `supabase db push` refuse to run. Versions the CLI
already applied (users who copied our files into their folder) count as applied here.

Before the first release the migrations were re-cut into one file per concern. A database that
applied the pre-release files cannot take the new ones on top (helpers were renamed, fragments
merged, one-off data fixes dropped), so `migrate` refuses it with what to do, and applies nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from sidecar.errors import SidecarError

__all__ = [
    "Migration", "MigrationError", "applied_versions", "bundled", "enable_sidecar_login", "migrate", "pending",
]  # fmt: skip

_NAME = re.compile(r"^(?P<version>[0-9]{14})_(?P<name>.+)\.sql$")
# The pre-release files, replaced by the 20261205 files: a database that recorded any of them must be re-created.
_PRE_RELEASE = frozenset({
    "20261121000001", "20261121000002", "20261204000001", "20261204000002", "20261204000003", "20261204000004",
})  # fmt: skip
# Any constant works as long as every sidecar uses the same one.
_LOCK_KEY = 0x736D735F6D6967  # "sms_mig"


class MigrationError(SidecarError, RuntimeError):
    """A migration failed; the message names the file, the line and the server's error."""

    def line(self, command: str) -> str:
        return f"sms-sidecar {command}: {'' if command == 'migrate' else 'migration '}failed in {self}"


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations_dir() -> Path:
    """The installed copy inside the wheel, else the source tree's `supabase/migrations`."""
    packaged = Path(__file__).with_name("migrations")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "supabase" / "migrations"


def bundled(directory: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((directory or migrations_dir()).glob("*.sql")):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(match["version"], match["name"], path))
    return found


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> set[str]:
    versions: set[str] = set()
    for table in ("sms.schema_migrations", "supabase_migrations.schema_migrations"):
        row = conn.execute("select to_regclass(%s) is not null", [table]).fetchone()
        if row and row[0]:
            query = sql.SQL("select version from {}").format(sql.Identifier(*table.split(".")))
            versions.update(str(v) for (v,) in conn.execute(query))
    return versions


def pending(conn: psycopg.Connection[tuple[object, ...]], directory: Path | None = None) -> list[Migration]:
    done = applied_versions(conn)
    return [m for m in bundled(directory) if m.version not in done]


def migrate(url: str, directory: Path | None = None) -> list[Migration]:
    """Apply what is pending, one transaction per file; returns what was applied."""
    applied: list[Migration] = []
    with psycopg.connect(url, autocommit=True) as conn:
        # Two replicas starting together must not both apply the same file.
        conn.execute("select pg_advisory_lock(%s)", [_LOCK_KEY])
        try:
            todo = pending(conn, directory)
            stale = sorted(_PRE_RELEASE & applied_versions(conn))
            if todo and stale:
                raise MigrationError(f"{todo[0].path.name}: {_pre_release_advice(stale)}")
            for migration in todo:
                _apply(conn, migration)
                applied.append(migration)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", [_LOCK_KEY])
    return applied


def _pre_release_advice(stale: list[str]) -> str:
    return (
        f"this database applied pre-release migrations ({', '.join(stale)}), which the first release re-cut"
        " into new files that cannot apply on top of them; nothing was applied. Re-create the database"
        " (`supabase db reset` locally), or, as postgres, remove this project's objects as README.md"
        " 'Uninstalling' shows (drop the three public functions, drop schema sms cascade; if the Supabase CLI"
        " applied the files, also delete those versions from supabase_migrations.schema_migrations)"
        " and run `sms-sidecar migrate` again. Codes, outbox and ledger are lost."
    )


def enable_sidecar_login(url: str, password: str) -> None:
    """Give the sms_sidecar role (created NOLOGIN by the migrations) a login with this password."""
    with psycopg.connect(url, autocommit=True) as conn:
        # Hashed here (SCRAM, as psql's \password does), so the plain password never reaches the
        # server's statement log.
        verifier = conn.pgconn.encrypt_password(password.encode(), b"sms_sidecar", b"scram-sha-256")
        conn.execute(sql.SQL("alter role sms_sidecar with login password {}").format(sql.Literal(verifier.decode())))


def _apply(conn: psycopg.Connection[tuple[object, ...]], migration: Migration) -> None:
    text = migration.sql
    try:
        with conn.transaction():
            conn.execute("reset all")
            conn.execute(
                "create schema if not exists sms;"
                "create table if not exists sms.schema_migrations ("
                " version text primary key, name text not null, checksum text not null,"
                " applied_at timestamptz not null default now());"
                "alter table sms.schema_migrations enable row level security;"
                "comment on table sms.schema_migrations is"
                " 'supabase-aliyun-sms: migrations applied by sms-sidecar migrate.'"
            )
            # No parameters: psycopg sends the whole file as one simple query, statements in order.
            conn.execute(text.encode("utf-8"))
            conn.execute(
                "insert into sms.schema_migrations (version, name, checksum) values (%s, %s, %s)",
                [migration.version, migration.name, migration.checksum],
            )
    except psycopg.Error as exc:
        raise MigrationError(_describe(migration, text, exc)) from exc


def _describe(migration: Migration, text: str, exc: psycopg.Error) -> str:
    diag = exc.diag
    where = ""
    if diag.statement_position:
        offset = int(diag.statement_position) - 1  # the server counts characters, from 1
        line_no = text.count("\n", 0, offset) + 1
        line = text.splitlines()[line_no - 1].strip() if text else ""
        where = f" at line {line_no}: {line[:120]}"
    message = diag.message_primary or str(exc).strip()
    detail = f" ({diag.context.strip()})" if diag.context else ""
    return f"{migration.path.name}{where}: {message}{detail}"
