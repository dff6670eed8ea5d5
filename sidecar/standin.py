"""Loads the Supabase stand-in (`standin.sql`) into a vanilla PostgreSQL database."""

from __future__ import annotations

from pathlib import Path

import psycopg

__all__ = ["has_supabase_roles", "load"]

SQL = Path(__file__).with_name("standin.sql")


def has_supabase_roles(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute(
        "select count(*) = 4 from pg_roles where rolname in ('anon', 'authenticated', 'service_role', 'postgres')"
    ).fetchone()
    return bool(row and row[0])


def load(superuser_url: str) -> None:
    """Needs a superuser and an empty database; roles already in the cluster are reused."""
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(SQL.read_bytes())
