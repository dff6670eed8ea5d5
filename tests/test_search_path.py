"""No caller can make a `security definer` function of ours run its code, through types in pg_temp.

`set search_path = ''` still looks up *type* names in pg_temp first, and any role may create
temporary objects: a domain `pg_temp.inet` whose check calls a temporary function would then run
that function as the owner wherever a definer function says `::inet`. Every function therefore
pins `search_path = pg_catalog, pg_temp` (pg_temp last), which these tests check in the catalog
and by mounting the attack, as each role that may call something, for every type the SQL names.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support.builders import fresh_phone
from tests.support.database import Database

MIGRATIONS = sorted((Path(__file__).resolve().parent.parent / "supabase" / "migrations").glob("*.sql"))
# Every built-in type the migrations name by a plain identifier (the last test keeps this complete).
# SQL-standard spellings (integer, bigint, boolean, interval, numeric, varchar) are keywords the parser
# maps to pg_catalog itself, so nothing in pg_temp can stand in for them.
TYPES = [
    "text", "uuid", "inet", "jsonb", "json", "int4", "int8", "bool", "bytea", "timestamptz", "regprocedure",
]  # fmt: skip
KEYWORD_TYPES = {"integer", "int", "bigint", "smallint", "boolean", "interval", "numeric", "varchar"}
PWNED = "PWNED-as-"


def test_every_function_pins_pg_catalog_then_pg_temp(database: Database) -> None:
    rows = database.execute(
        "select p.oid::regprocedure::text, p.proconfig from pg_proc as p"
        " join pg_namespace as n on n.oid = p.pronamespace where n.nspname = 'sms' or (n.nspname = 'public'"
        " and p.proname in ('request_phone_code', 'verify_phone_code', 'phone_code_status'))"
    )
    assert len(rows) > 30
    unpinned = [(name, config) for name, config in rows if "search_path=pg_catalog, pg_temp" not in (config or [])]
    assert unpinned == []


@pytest.fixture
def attacker(database: Database) -> Iterator[Any]:
    """A connection as superuser that becomes a given role and plants `pg_temp.<type>` domains."""
    assert database.superuser_url is not None
    with psycopg.connect(database.superuser_url) as conn:

        def become(role: str, type_name: str) -> psycopg.Connection[Any]:
            conn.rollback()
            conn.execute(sql.SQL("set role {}").format(sql.Identifier(role)))
            conn.execute(
                "create function pg_temp.pwn(anyelement) returns boolean language plpgsql as"
                f" $$ begin raise exception '{PWNED}%', current_user; end $$"
            )
            conn.execute(
                sql.SQL("create domain pg_temp.{} as pg_catalog.{} check (pg_temp.pwn(value))").format(
                    sql.Identifier(type_name), sql.SQL(type_name)
                )
            )
            return conn

        yield become
        conn.rollback()


def attempt(conn: psycopg.Connection[Any], query: str, params: Any = None) -> str:
    """Run one call in a savepoint; return the error text (empty on success)."""
    try:
        with conn.transaction():
            conn.execute(query, params)
    except psycopg.Error as exc:
        return f"{exc.diag.message_primary}"
    return ""


def hook_event(phone: str) -> str:
    event = {
        "metadata": {"uuid": str(uuid.uuid4()), "name": "send-sms", "ip_address": "198.51.100.7"},
        "user": {"phone": ""},
        "sms": {"otp": "123456", "phone": phone.lstrip("+")},
    }
    return json.dumps(event)


@pytest.mark.parametrize("type_name", TYPES)
def test_a_planted_pg_temp_type_never_runs_as_the_owner(attacker: Any, type_name: str) -> None:
    claims = '{"role": "authenticated", "sub": "5f0b6d6e-2f5e-4c36-9f3a-6f0d2b8c1a10"}'
    headers = '{"x-forwarded-for": "198.51.100.7/24, ::ffff:198.51.100.7"}'
    phone = fresh_phone()
    calls: list[tuple[str, str, Any]] = [
        (
            "sms_sidecar",
            "select sms.hook_begin_many(pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object("
            "'event', %s::pg_catalog.jsonb, 'body_sha256', 'x')), 'w')",
            [hook_event(phone)],
        ),
        ("sms_sidecar", "select * from sms.claim_messages('w', 5, 30)", None),
        (
            "sms_sidecar",
            "select sms.record_receipts(%s::pg_catalog.jsonb)",
            [
                json.dumps(
                    [
                        {
                            "out_id": "1",
                            "biz_id": "1^0",
                            "phone": "13800000000",
                            "success": True,
                            "code": "DELIVERED",
                            "message": "",
                            "report_time": "2026-12-06T10:00:00+08:00",
                            "send_time": None,
                        }
                    ]
                )
            ],
        ),
        ("sms_sidecar", "select * from sms.receipts_due(60, 5)", None),
        ("sms_sidecar", "select sms.receipt_stats()", None),
        ("sms_sidecar", """select sms.finish_deliveries('[{"delivery_id": -1, "outcome": "accepted"}]')""", None),
        ("sms_sidecar", "select sms.release_messages('w')", None),
        ("sms_sidecar", "select sms.queue_stats()", None),
        ("sms_sidecar", "select sms.message_state('00000000-0000-4000-8000-000000000000')", None),
        ("sms_sidecar", "select sms.schema_version()", None),
        ("sms_sidecar", "select sms.test_number_count()", None),
        ("sms_grpc", "select sms.grpc_send_code(%s, null, null)", [fresh_phone()]),
        ("sms_grpc", "select sms.grpc_verify_code(%s, '123456')", [phone]),
        ("supabase_auth_admin", "select sms.send_sms_hook(%s::pg_catalog.jsonb)", [hook_event(fresh_phone())]),
    ]
    api_calls = [
        "select public.request_phone_code(%s)",
        "select public.verify_phone_code(%s, '123456')",
        "select public.phone_code_status('00000000-0000-4000-8000-000000000000')",
    ]
    errors = []
    for role, query, params in calls:
        conn = attacker(role, type_name)
        errors.append((role, query, attempt(conn, query, params)))
    for query in api_calls:
        conn = attacker("authenticated", type_name)
        conn.execute("select pg_catalog.set_config('request.jwt.claims', %s, false)", [claims])
        conn.execute("select pg_catalog.set_config('request.headers', %s, false)", [headers])
        errors.append(("authenticated", query, attempt(conn, query, [fresh_phone()])))
    escalated = [(role, query, error) for role, query, error in errors if PWNED in error]
    assert escalated == []
    # The attack is real: under an empty search_path the planted domain runs for an unqualified type.
    conn = attacker("sms_sidecar", type_name)
    conn.execute("set search_path = ''")
    assert f"{PWNED}sms_sidecar" in attempt(conn, f"select null::{type_name}")


def test_the_attack_list_covers_every_type_the_migrations_name(database: Database) -> None:
    named: set[str] = set()
    for path in MIGRATIONS:
        text = re.sub(r"--[^\n]*", "", path.read_text(encoding="utf-8")).lower()
        named |= set(re.findall(r"::\s*([a-z_][a-z0-9_.]*)", text))  # casts
        named |= set(re.findall(r"\b(?:returns|setof)\s+([a-z_][a-z0-9_.]*)", text))
        named |= set(re.findall(r"[(,]\s*(?:out\s+)?[a-z_][a-z0-9_]*\s+([a-z_][a-z0-9_.]*)", text))  # parameters
        for block in re.findall(r"\bdeclare\b(.*?)\bbegin\b", text, re.S):
            named |= set(re.findall(r"^\s*[a-z_][a-z0-9_]*\s+([a-z_][a-z0-9_.]*)", block, re.M))
    plain = {name for name in named if "." not in name}  # schema-qualified names are immune
    assert {"text", "uuid", "jsonb", "inet"} <= plain, "the scan missed obvious types: the patterns are broken"
    not_types = {"table", "trigger", "void", "record", "as", "default", "in", "from", "then", "else", "and", "or"}
    candidates = {n for n in plain if n not in not_types and n not in KEYWORD_TYPES}
    # Names the scan finds that are no pg_catalog type are columns or variables.
    catalog = {
        name
        for (name,) in database.execute("select typname from pg_type where typnamespace = 'pg_catalog'::regnamespace")
    }
    real = candidates & catalog
    assert real <= set(TYPES), sorted(real - set(TYPES))
