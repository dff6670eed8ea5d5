"""Delivery results, recorded several to a statement (sms.finish_deliveries; see sidecar/batches.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.batches import Batcher
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
        self._batcher = Batcher(pool, "select sms.finish_deliveries(%(items)s)", max_batch=MAX_BATCH, timeout=5.0)

    async def finish(self, item: Finished, timeout: float) -> str:
        """Record one result; returns the message's new status once its statement has committed."""
        return str(await self._batcher.submit(item.as_json(), timeout))
