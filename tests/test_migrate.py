"""`sms-sidecar migrate` against fresh databases in the same server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from sidecar import standin
from sidecar.migrate import bundled
from tests.support.database import Database, run_migrate


@pytest.fixture
def empty_db(database: Database) -> Iterator[tuple[str, str]]:
    """A new database with the Supabase stand-in and nothing of ours: (owner url, superuser url)."""
    if database.superuser_url is None:
        pytest.fail("these tests need a superuser URL to create scratch databases")
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database.superuser_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(database.superuser_url)
    su_url = psycopg.conninfo.make_conninfo(**{**info, "dbname": name})  # type: ignore[arg-type]
    owner_url = psycopg.conninfo.make_conninfo(
        **{**psycopg.conninfo.conninfo_to_dict(database.url), "dbname": name}  # type: ignore[arg-type]
    )
    standin.load(su_url)
    yield owner_url, su_url
    with psycopg.connect(database.superuser_url, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def scalar(url: str, query: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0]


def test_applies_everything_once_and_records_it_in_its_own_table(empty_db: tuple[str, str]) -> None:
    url, _ = empty_db
    first = run_migrate(url)
    assert first.returncode == 0, first.stderr
    assert all(m.path.name in first.stdout for m in bundled())
    second = run_migrate(url)
    assert second.returncode == 0 and "(0 applied)" in second.stdout
    assert scalar(url, "select count(*) from sms.schema_migrations") == len(bundled())
    # The Supabase CLI's history table is left alone, so the user's `supabase db push` keeps working.
    assert scalar(url, "select to_regclass('supabase_migrations.schema_migrations')") is None
    assert scalar(url, "select sms.schema_version()") == bundled()[-1].version


def test_versions_applied_by_the_supabase_cli_count_as_applied(empty_db: tuple[str, str]) -> None:
    url, _ = empty_db
    # What `supabase db push` does with a copied file: run it, then record the version.
    with psycopg.connect(url, autocommit=True) as conn:
        for migration in bundled():
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    "create schema if not exists supabase_migrations;"
                    "create table if not exists supabase_migrations.schema_migrations"
                    " (version text primary key, statements text[], name text)"
                )
                conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, name) values (%s, %s)",
                    [migration.version, migration.name],
                )
    result = run_migrate(url)
    assert result.returncode == 0, result.stderr
    assert "(0 applied)" in result.stdout


def test_migrations_are_safe_to_run_twice(empty_db: tuple[str, str]) -> None:
    """Re-running a file (a user pasting it into the SQL editor again) neither fails nor resets data."""
    url, _ = empty_db
    assert run_migrate(url).returncode == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("update sms.settings set max_attempts = 5")
        key = conn.execute("select code_hmac_key from sms.secrets").fetchone()
        for migration in bundled():
            conn.execute(migration.sql.encode())
        assert conn.execute("select max_attempts from sms.settings").fetchone() == (5,)
        assert conn.execute("select code_hmac_key from sms.secrets").fetchone() == key


def test_a_failing_file_is_named_with_its_line_and_rolled_back(empty_db: tuple[str, str], tmp_path: Path) -> None:
    url, _ = empty_db
    for migration in bundled():
        (tmp_path / migration.path.name).write_bytes(migration.path.read_bytes())
    (tmp_path / "29991231000000_broken.sql").write_text(
        "create table sms.half_done (id int);\n\nselect 1;\nselect * from sms.no_such_table;\n"
    )
    result = run_migrate(url, "--dir", str(tmp_path))
    assert result.returncode == 1
    assert "29991231000000_broken.sql at line 4" in result.stderr
    assert "no_such_table" in result.stderr
    assert scalar(url, "select to_regclass('sms.half_done')") is None
    assert scalar(url, "select count(*) from sms.schema_migrations where version = '29991231000000'") == 0


def test_unreachable_database_is_one_clear_line() -> None:
    result = run_migrate("postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 1
    assert result.stderr.startswith("sms-sidecar migrate: cannot reach the database")
    assert "Traceback" not in result.stderr


def test_missing_database_url_is_named() -> None:
    result = run_migrate("")
    assert result.returncode != 0 and "DATABASE_URL" in result.stderr


def test_the_sidecar_role_cannot_log_in_until_an_operator_allows_it(empty_db: tuple[str, str]) -> None:
    # Roles are cluster-wide and other tests log in as sms_sidecar, so start from NOLOGIN here:
    # migrating (without SMS_SIDECAR_DB_PASSWORD) must not hand out a login.
    url, su_url = empty_db
    with psycopg.connect(su_url, autocommit=True) as conn:
        conn.execute("alter role sms_sidecar nologin")
    assert run_migrate(url).returncode == 0
    assert scalar(url, "select rolcanlogin from pg_roles where rolname = 'sms_sidecar'") is False


def test_migrate_can_give_the_sidecar_role_its_login(empty_db: tuple[str, str]) -> None:
    url, su_url = empty_db
    result = run_migrate(url, env={"SMS_SIDECAR_DB_PASSWORD": "s3cret-from-env"})
    assert result.returncode == 0, result.stderr
    assert "s3cret-from-env" not in result.stdout + result.stderr
    can_login = scalar(su_url, "select rolcanlogin from pg_authid where rolname = 'sms_sidecar'")
    stored = scalar(su_url, "select rolpassword from pg_authid where rolname = 'sms_sidecar'")
    assert can_login is True
    # Only the SCRAM verifier reached the server, never the password itself.
    assert str(stored).startswith("SCRAM-SHA-256$") and "s3cret-from-env" not in str(stored)


@pytest.mark.parametrize("table", ["sms.schema_migrations", "supabase_migrations.schema_migrations"])
def test_a_database_of_the_pre_release_files_is_told_to_be_re_created(empty_db: tuple[str, str], table: str) -> None:
    """The pre-release files were re-cut by concern before the first release: a database that recorded
    any of them (by `sms-sidecar migrate` or the Supabase CLI) gets what to do, and nothing applied."""
    url, _ = empty_db
    with psycopg.connect(url, autocommit=True) as conn:
        schema = table.split(".")[0]
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("create table {} (version text primary key, name text, checksum text)").format(
                sql.Identifier(*table.split("."))
            )
        )
        conn.execute(
            sql.SQL("insert into {} (version, name) values ('20261121000001', 'sms_core')").format(
                sql.Identifier(*table.split("."))
            )
        )
    result = run_migrate(url)
    assert result.returncode == 1
    assert f"{bundled()[0].path.name}: this database applied pre-release migrations (20261121000001)" in result.stderr
    assert "Re-create the database" in result.stderr and "drop schema sms cascade" in result.stderr
    assert "Traceback" not in result.stderr
    assert scalar(url, "select to_regclass('sms.outbox')") is None
