"""Delivery results, recorded several to a statement (sms.finish_deliveries).

Under load many sends finish at about the same moment, and each result used to be a statement and a
commit of its own. `ResultWriter.finish` queues a result and waits for its commit: while one
statement is on its way, the results that arrive meanwhile wait and go together in the next one.
Alone, a result goes at once, as before. When a batch fails, each of its results is retried alone,
so one bad result cannot fail the others.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from sidecar.db import call
from sidecar.providers.base import SendResult

__all__ = ["Finished", "ResultWriter"]

MAX_BATCH = 64


@dataclass(frozen=True)
class Finished:
    """One result for sms.finish_delivery."""

    delivery_id: int
    result: SendResult
    provider: str
    latency_ms: int
    retry_in_seconds: int
    max_attempts: int

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {"delivery_id": self.delivery_id, "outcome": r.outcome.value, "provider": self.provider,
                "provider_code": r.code, "provider_message": r.message, "biz_id": r.biz_id,
                "provider_request_id": r.request_id, "latency_ms": self.latency_ms,
                "retry_in_seconds": self.retry_in_seconds, "max_attempts": self.max_attempts}  # fmt: skip


class ResultWriter:
    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]) -> None:
        self._pool = pool
        self._waiting: list[tuple[Finished, asyncio.Future[str]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def finish(self, item: Finished, timeout: float) -> str:
        """Record one result; returns the message's new status once its statement has committed."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="sms-results")
        # shield: a caller that stops waiting must not cancel the statement the others wait for.
        return await asyncio.wait_for(asyncio.shield(done), timeout)

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            if not await self._write(batch) and len(batch) > 1:
                for one in batch:  # one bad result must not fail the others: each alone
                    await self._write([one])

    async def _write(self, batch: list[tuple[Finished, asyncio.Future[str]]]) -> bool:
        """One statement for the batch; settles its waiters, or (alone) hands it the error."""
        try:
            statuses = await call(self._pool, "select sms.finish_deliveries(%(items)s)",
                                  {"items": Jsonb([item.as_json() for item, _ in batch])}, timeout=5.0)  # fmt: skip
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
            return False
        for (_, done), status in zip(batch, statuses, strict=True):
            _settle(done, str(status))
        return True


def _settle(done: asyncio.Future[str], status: str | None = None, exc: BaseException | None = None) -> None:
    if done.done():  # its caller gave up waiting
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(status or "")
