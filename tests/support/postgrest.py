"""Calls SQL functions exactly as PostgREST (and so `supabase.rpc`) does.

One transaction per call; `set local role` to the JWT's role; `request.jwt.claims`,
`request.headers` and `request.method` as transaction-local settings; named arguments; commit on
success, roll back on error; SQLSTATE mapped to the HTTP status PostgREST would answer with,
`response.status`/`response.headers` honoured, SQLSTATE PGRST decoded.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: the JWT role and claims, and the headers the proxies set."""

    role: str = "anon"
    sub: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    is_anonymous: bool = False  # a Supabase anonymous sign-in: role authenticated, a fresh sub each

    @property
    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"role": self.role}
        if self.sub is not None:
            claims.update(sub=self.sub, aud="authenticated", is_anonymous=self.is_anonymous)
        return claims


ANON = Caller("anon")
SERVICE = Caller("service_role")


def user(uid: str | None = None, **headers: str) -> Caller:
    return Caller("authenticated", uid or str(uuid.uuid4()), {k.replace("_", "-"): v for k, v in headers.items()})


def _status_for(exc: psycopg.Error, role: str) -> int:
    code = exc.sqlstate or ""
    if code.startswith("PT") and code[2:].isdigit():
        return int(code[2:])
    if code == "42501":
        return 401 if role == "anon" else 403
    if code in ("42883", "42P01"):
        return 404
    if code in ("23505", "23503"):
        return 409
    if code == "25006":
        return 405
    if code == "P0001":
        return 400
    if code.startswith(("P0", "57", "XX")):
        return 500
    if code.startswith(("53", "08")):
        return 503
    return 400


class PostgREST:
    def __init__(self, url: str, max_size: int = 40) -> None:
        # Checked on checkout, so calls after a database restart get a fresh connection, as PostgREST does.
        self.pool = ConnectionPool(url, min_size=1, max_size=max_size, open=True, check=ConnectionPool.check_connection)

    def close(self) -> None:
        self.pool.close()

    def rpc(self, fn: str, args: dict[str, Any] | None = None, caller: Caller = ANON) -> Response:
        args = args or {}
        schema, _, name = fn.rpartition(".")
        call = sql.SQL("select {}.{}({})").format(
            sql.Identifier(schema or "public"),
            sql.Identifier(name),
            sql.SQL(", ").join(sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder()) for k in args),
        )
        with self.pool.connection() as conn:
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("set local role {}").format(sql.Identifier(caller.role)))
                    conn.execute(
                        "select set_config('request.jwt.claims', %s, true),"
                        " set_config('request.headers', %s, true),"
                        " set_config('request.method', 'POST', true),"
                        " set_config('request.path', %s, true)",
                        [json.dumps(caller.claims), json.dumps(caller.headers), f"/rpc/{name}"],
                    )
                    row = conn.execute(call, list(args.values())).fetchone()
                    status, headers = conn.execute(
                        "select current_setting('response.status', true), current_setting('response.headers', true)"
                    ).fetchone()  # type: ignore[misc]
            except psycopg.Error as exc:
                return self._error(exc, caller.role)
        extra = {k: v for h in json.loads(headers or "[]") for k, v in h.items()}
        return Response(int(status) if status else 200, row[0] if row else None, extra)

    @staticmethod
    def _error(exc: psycopg.Error, role: str) -> Response:
        diag = exc.diag
        if exc.sqlstate == "PGRST":
            body = json.loads(diag.message_primary or "{}")
            meta = json.loads(diag.message_detail or "{}")
            return Response(int(meta["status"]), body, dict(meta.get("headers") or {}))
        body = {
            "code": exc.sqlstate,
            "message": diag.message_primary,
            "details": diag.message_detail,
            "hint": diag.message_hint,
        }
        return Response(_status_for(exc, role), body)
