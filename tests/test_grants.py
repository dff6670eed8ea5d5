"""Privileges and the Supabase security lints, checked against the catalog and by calling as each role."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import store
from tests.support.database import Database
from tests.support.postgrest import ANON, SERVICE, Caller, PostgREST, user

API_ROLES = ("anon", "authenticated", "service_role")
WRAPPERS = {
    "request_phone_code": {"phone": "+8613012345678"},
    "verify_phone_code": {"phone": "+8613012345678", "code": "123456"},
    "phone_code_status": {"request_id": "00000000-0000-4000-8000-000000000000"},
}
# What each process calls, and nothing more: `serve` (hook and worker) and the gRPC drop-in, as
# sidecar/store.py lists them. sms.purge is the operator's (pg_cron as postgres).
SIDECAR_FUNCTIONS = {fn.removeprefix("sms.").partition("(")[0] for fn in store.SIDECAR_FUNCTIONS}
GRPC_FUNCTIONS = {fn.removeprefix("sms.").partition("(")[0] for fn in store.GRPC_FUNCTIONS}


def our_functions(db: Database) -> list[tuple[str, str, bool, list[str] | None]]:
    """Every function the migrations created: schema sms plus the wrappers in public."""
    rows = db.execute(
        "select n.nspname, p.proname, p.prosecdef, p.proconfig from pg_proc as p"
        " join pg_namespace as n on n.oid = p.pronamespace"
        " where n.nspname = 'sms' or (n.nspname = 'public' and p.proname = any(%s))",
        [list(WRAPPERS)],
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


@pytest.mark.parametrize("fn", list(WRAPPERS))
def test_anon_cannot_call_the_api(api: PostgREST, fn: str) -> None:
    response = api.rpc(fn, WRAPPERS[fn], ANON)
    assert response.status == 401
    assert response.body["code"] == "42501"


@pytest.mark.parametrize("fn", list(WRAPPERS))
@pytest.mark.parametrize("caller", [user(), SERVICE], ids=["authenticated", "service_role"])
def test_signed_in_users_and_the_service_role_can(api: PostgREST, fn: str, caller: Caller, settings: Any) -> None:
    settings(resend_cooldown_seconds=None)
    response = api.rpc(fn, WRAPPERS[fn], caller)
    assert response.status in (200, 404), response.body  # 404: the status of an unknown request id


def test_allow_anon_grants_and_revokes(api: PostgREST, database: Database, settings: Any) -> None:
    settings(allow_anon=True, resend_cooldown_seconds=None)
    assert database.one("select has_function_privilege('anon', 'public.request_phone_code(text, text)', 'execute')")
    assert api.rpc("request_phone_code", {"phone": "+8613912345678"}, ANON).status == 200
    settings(allow_anon=False)
    assert not database.one("select has_function_privilege('anon', 'public.request_phone_code(text, text)', 'execute')")
    assert not database.one("select has_schema_privilege('anon', 'sms', 'usage')")
    assert api.rpc("request_phone_code", {"phone": "+8613912345678"}, ANON).status == 401


def test_no_table_is_reachable_by_api_roles_or_the_sidecar(database: Database) -> None:
    tables = [
        t
        for (t,) in database.execute(
            "select c.oid::regclass::text from pg_class as c"
            " where c.relnamespace = 'sms'::regnamespace and c.relkind = 'r'"
        )
    ]
    assert "sms.codes" in tables and "sms.outbox" in tables and "sms.settings" in tables
    for role in (*API_ROLES, "sms_sidecar", "sms_grpc", "supabase_auth_admin"):
        for table in tables:
            for privilege in ("select", "insert", "update", "delete"):
                assert not database.one("select has_table_privilege(%s, %s, %s)", [role, table, privilege]), (
                    role,
                    table,
                    privilege,
                )


def test_rls_is_enabled_on_every_table(database: Database) -> None:
    without = database.execute(
        "select relname from pg_class where relnamespace = 'sms'::regnamespace and relkind = 'r' and not relrowsecurity"
    )
    assert without == []


def test_security_definer_only_in_the_private_schema(database: Database) -> None:
    for schema, name, definer, _ in our_functions(database):
        if schema == "public":
            assert not definer, name


def test_private_functions_are_callable_only_by_whom_they_are_for(database: Database) -> None:
    api_facing = {"request_code", "verify_code", "code_status"}
    for schema, name, _, _ in our_functions(database):
        if schema != "sms":
            continue
        oids = [
            o
            for (o,) in database.execute(
                "select p.oid::regprocedure::text from pg_proc as p where p.pronamespace = 'sms'::regnamespace"
                " and p.proname = %s",
                [name],
            )
        ]
        for signature in oids:
            grantees = {
                role
                for role in (*API_ROLES, "sms_sidecar", "sms_grpc", "supabase_auth_admin", "public")
                if role != "public"
                and database.one("select has_function_privilege(%s, %s, 'execute')", [role, signature])
            }
            expected = (
                ({"authenticated", "service_role"} if name in api_facing else set())
                | ({"sms_sidecar"} if name in SIDECAR_FUNCTIONS else set())
                | ({"sms_grpc"} if name in GRPC_FUNCTIONS else set())
                | ({"supabase_auth_admin"} if name == "send_sms_hook" else set())
            )
            assert grantees == expected, (signature, grantees)


def test_public_has_no_execute_on_anything_of_ours(database: Database) -> None:
    rows = database.execute(
        "select p.oid::regprocedure::text from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace"
        " cross join lateral aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) as a"
        " where (n.nspname = 'sms' or p.proname = any(%s)) and a.grantee = 0",
        [list(WRAPPERS)],
    )
    assert rows == []


def test_exposed_schema_has_no_sensitive_tables(database: Database) -> None:
    exposed = database.execute(
        "select c.relname from pg_class as c join pg_attribute as a on a.attrelid = c.oid"
        " where c.relnamespace = 'public'::regnamespace and a.attname ~ '(otp|code|token)'"
    )
    assert exposed == []


def test_the_operator_view_is_postgres_only_and_hides_codes_and_numbers(database: Database, api: PostgREST) -> None:
    from sidecar.logs import mask_phone

    (options,) = database.one(
        "select reloptions from pg_class where oid = 'sms.delivery_log'::regclass and relkind = 'v'"
    )
    assert options == "security_invoker=true" or "security_invoker=true" in options
    assert database.one("select pg_get_userbyid(relowner) from pg_class where oid = 'sms.delivery_log'::regclass") == (
        "postgres"
    )
    assert database.one("select obj_description('sms.delivery_log'::regclass, 'pg_class')")
    granted = database.execute(
        "select a.grantee::regrole::text from pg_class as c cross join lateral aclexplode(c.relacl) as a"
        " where c.oid = 'sms.delivery_log'::regclass and a.grantee <> c.relowner"
    )
    assert granted == []
    for role in (*API_ROLES, "sms_sidecar", "sms_grpc", "supabase_auth_admin"):
        assert not database.one("select has_table_privilege(%s, 'sms.delivery_log', 'select')", [role]), role
    columns = {c for (c,) in database.execute(
        "select attname from pg_attribute where attrelid = 'sms.delivery_log'::regclass and attnum > 0"
    )}  # fmt: skip
    assert not columns & {"code", "phone", "client_ip", "ip_key", "dedup_key"}
    phones = ["8613012341234", "14155550123", "447700900123", "3725551234", "88612345678"]
    for phone in phones:
        assert api.rpc("request_phone_code", {"phone": "+" + phone}, SERVICE).status in (200, 400)
    shown = dict(database.execute(
        "select o.phone, l.phone_masked from sms.delivery_log as l join sms.outbox as o on o.id = l.message_id"
        " where o.phone = any(%s)",
        [phones],
    ))  # fmt: skip
    assert shown and all(masked == mask_phone(phone) for phone, masked in shown.items())
