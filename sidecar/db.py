"""The sidecar's connection pool and how it reads errors raised by the SQL core."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

__all__ = ["ApiError", "call", "create_pool"]

STATEMENT_TIMEOUT_MS = 3000


class ApiError(Exception):
    """An error the SQL core raised for the caller (SQLSTATE PGRST): bad input or a limit."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_pgrst(cls, exc: psycopg.Error) -> ApiError:
        return cls.from_parts(json.loads(exc.diag.message_primary or "{}"), json.loads(exc.diag.message_detail or "{}"))

    @classmethod
    def from_parts(cls, body: dict[str, Any], meta: dict[str, Any]) -> ApiError:
        """From sms._raise_api_error's message (body) and detail (status and headers), as JSON."""
        retry = (meta.get("headers") or {}).get("Retry-After")
        return cls(int(meta.get("status", 400)), str(body.get("code", "")), str(body.get("message", "")),
                   int(retry) if retry else None)  # fmt: skip


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # A stuck query must not outlive GoTrue's 5-second hook deadline.
    await conn.execute(f"set statement_timeout = {STATEMENT_TIMEOUT_MS}")


def create_pool(url: str, max_size: int = 10) -> AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]:
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=False,
        kwargs={"application_name": "sms-sidecar", "row_factory": dict_row, "autocommit": True},
        configure=_configure,
        reconnect_timeout=24 * 3600,  # keep trying through a database restart instead of giving up
    )


async def call(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]],
    query: str,
    params: dict[str, Any],
    timeout: float,
    role: str | None = None,
) -> Any:
    """Run one statement (its own transaction) and return the first column of its row.

    With `role`, the statement runs as that role (`set local role`), which the login must be a member
    of: the gRPC functions belong to `sms_grpc`, not to every sidecar process.
    """
    async with pool.connection(timeout=timeout) as conn:
        try:
            if role is None:
                cur = await conn.execute(query, params)
                row = await cur.fetchone()
            else:
                async with conn.transaction():
                    await conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
                    cur = await conn.execute(query, params)
                    row = await cur.fetchone()
        except psycopg.Error as exc:
            if exc.sqlstate == "PGRST":
                raise ApiError.from_pgrst(exc) from None
            raise
    return next(iter(row.values())) if row else None
