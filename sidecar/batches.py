"""Statements shared by concurrent requests: what arrives while one runs goes together in the next.

Under load many hook requests begin, and many sends finish, at about the same moment; each used to
be a statement and a commit of its own, with as many backends contending in PostgreSQL as the pool
had connections. A `Batcher` queues an item and waits for the commit of the statement that carried
it. Alone, an item goes at once. When a statement fails, each of its items is retried alone, so one
bad item cannot fail the others (and gets its own error).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from sidecar.db import call

__all__ = ["Batcher"]


class Batcher:
    """`query` takes the items as the JSON array `%(items)s` (plus the fixed `params`) and returns a
    JSON array with one answer per item, in order."""

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]],
        query: str,
        *,
        max_batch: int,
        timeout: float,
        params: dict[str, Any] | None = None,
    ) -> None:
        self._pool = pool
        self._query = query
        self._params = params or {}
        self._max_batch = max_batch
        self._timeout = timeout
        self._waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: Any, timeout: float) -> Any:
        """One item in; its answer once the statement that carried it has committed."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="sms-batch")
        # shield: a caller that stops waiting must not cancel the statement the others wait for.
        async with asyncio.timeout(timeout):  # no extra task per call, unlike wait_for
            return await asyncio.shield(done)

    async def _flush(self) -> None:
        while self._waiting:
            size = self._max_batch
            batch, self._waiting = self._waiting[:size], self._waiting[size:]
            if not await self._run(batch) and len(batch) > 1:
                for one in batch:  # one bad item must not fail the others: each alone
                    await self._run([one])

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> bool:
        """One statement for the batch; settles its waiters, or (alone) hands it the error."""
        try:
            answers = await call(self._pool, self._query, {**self._params, "items": Jsonb([i for i, _ in batch])},
                                 timeout=self._timeout)  # fmt: skip
        except Exception as exc:
            if len(batch) == 1 and not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return False
        for (_, done), answer in zip(batch, answers, strict=True):
            if not done.done():  # its caller gave up waiting
                done.set_result(answer)
        return True
