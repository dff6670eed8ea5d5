"""The database fixtures: one real PostgreSQL for the whole session, migrated with `sms-sidecar migrate`.

The database is, in order: TEST_DATABASE_URL if set; else a `supabase/postgres` container when a
Docker engine answers; else a throwaway local cluster from the PostgreSQL server binaries, loaded
with the Supabase stand-in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from sidecar import standin
from sidecar.localpg import LocalCluster
from tests.support.postgrest import PostgREST

SUPABASE_IMAGE = "supabase/postgres:15.8.1.085"


@dataclass(frozen=True)
class Database:
    url: str  # the `postgres` role: owns what the migrations create, as on Supabase
    superuser_url: str | None  # for extensions such as pgTAP; None when not available
    cluster: LocalCluster | None = None  # only a local cluster can be crashed and restarted by tests

    def execute(self, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def one(self, query: str | sql.Composable, params: Any = None) -> Any:
        rows = self.execute(query, params)
        assert len(rows) == 1, rows
        return rows[0][0] if len(rows[0]) == 1 else rows[0]


def _docker_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    import docker

    try:
        client = docker.from_env(timeout=2)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _with_user(url: str, user: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["user"] = user
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def run_migrate(url: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "migrate", *extra],
        env={**os.environ, "DATABASE_URL": url, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextmanager
def _resolve() -> Iterator[Database]:
    if os.environ.get("TEST_DATABASE_URL"):
        url = os.environ["TEST_DATABASE_URL"]
        with psycopg.connect(url, autocommit=True) as conn:
            if not standin.has_supabase_roles(conn):
                standin.load(url)
        yield Database(url=url, superuser_url=url)
    elif _docker_answers():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(
            SUPABASE_IMAGE, username="postgres", password="postgres", dbname="postgres", driver=None
        ) as container:
            url = container.get_connection_url()
            yield Database(url=url, superuser_url=_with_user(url, "supabase_admin"))
    else:
        with LocalCluster() as cluster:
            standin.load(cluster.url())
            yield Database(url=cluster.url("postgres"), superuser_url=cluster.url(), cluster=cluster)


@pytest.fixture(scope="session")
def database() -> Iterator[Database]:
    with _resolve() as db:
        result = run_migrate(db.url)
        assert result.returncode == 0, result.stderr
        yield db


@pytest.fixture(scope="session")
def api(database: Database) -> Iterator[PostgREST]:
    client = PostgREST(database.url)
    yield client
    client.close()


@pytest.fixture
def settings(database: Database) -> Iterator[Any]:
    """Change sms.settings for one test: `settings(resend_cooldown_seconds=None)`; restored afterwards."""
    saved = database.one("select to_jsonb(s) from sms.settings as s")

    def change(**values: Any) -> None:
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder()) for k in values
        )
        database.execute(
            sql.SQL("update sms.settings set {} where id").format(assignments),
            [psycopg.types.json.Jsonb(v) if isinstance(v, dict) else v for v in values.values()],
        )

    yield change
    # Every policy column, so one added by a later migration is restored too.
    columns = [
        sql.Identifier(name)
        for (name,) in database.execute(
            "select attname from pg_attribute where attrelid = 'sms.settings'::regclass and attnum > 0"
            " and not attisdropped and attname not in ('id', 'updated_at') order by attnum"
        )
    ]
    database.execute(
        sql.SQL(
            "update sms.settings as s set ({}) = (select {} from jsonb_populate_record(null::sms.settings, %s) as r)"
            " where s.id"
        ).format(sql.SQL(", ").join(columns), sql.SQL(", ").join(sql.SQL("r.") + c for c in columns)),
        [psycopg.types.json.Jsonb(saved)],
    )


def auth_limits_hit(database: Database, phone: str) -> tuple[list[str], int]:
    """The limits (and seconds to wait) that refuse one more Auth hook SMS to `phone` now: the check both
    hook paths run (sms._enforce_send_limits for the requester 'auth', who owns the number), rolled back."""
    with psycopg.connect(database.url) as conn:
        try:
            conn.execute("select sms._enforce_send_limits(%s, 'auth', true, null, null)", [phone])
        except psycopg.Error as exc:
            details = json.loads(json.loads(exc.diag.message_primary or "{}")["details"])
            return list(details["limits"]), int(details["retry_after"])
        finally:
            conn.rollback()
    return [], 0


def drain_queue(database: Database) -> None:
    """Give up every pending message, so a sidecar started by a test sees only that test's messages."""
    database.execute("update sms.outbox set status = 'failed', code = null where status in ('queued', 'sending')")


def all_sent(database: Database, phones: list[str]) -> bool:
    done = database.one("select count(*) from sms.outbox where phone = any(%s) and status = 'sent'", [phones])
    return bool(done == len(phones))


def call_hook(database: Database, body: bytes) -> Any:
    """One GoTrue phone-flow transaction: the hook's writes commit only if GoTrue succeeds."""
    with psycopg.connect(database.url) as conn:
        conn.execute("set role supabase_auth_admin")
        conn.execute("set local statement_timeout to '2000'")
        # GoTrue's query, with its $1 placeholder and the hook body as the text of that parameter.
        with psycopg.RawCursor(conn) as cur:
            (result,) = cur.execute('select "sms"."send_sms_hook"($1)', [body.decode()]).fetchone()  # type: ignore[misc]
        if "error" not in result:
            conn.commit()
        return result
