"""Delivery receipts by asking: QuerySendDetails about sends still without a receipt, for a sidecar
Aliyun cannot push to (SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS).

Every replica may run it: sms.receipts_due hands each send to one of them, at most three times,
SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS apart. Calls are paced to SMS_WORKER_RECEIPT_POLL_QPS per
process, well inside the account's API rate, which the sends share. The answers are stored as a
pushed receipt would be (sms.record_receipts), so a push arriving as well changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import psycopg

from sidecar.errors import DatabaseUnavailable, failure_name
from sidecar.receipts import observe_receipts
from sidecar.runtime import Runtime
from sidecar.store import ReceiptDue

__all__ = ["ReceiptPoller"]

log = logging.getLogger("sidecar.receipts")

QUERY_SECONDS = 5.0


class ReceiptPoller:
    def __init__(self, rt: Runtime, after_seconds: int, qps: float) -> None:
        self.rt = rt
        self.after_seconds = after_seconds
        self.interval = 1.0 / qps
        # Nothing due: look again soon enough that a send is asked about near its time.
        self.idle_seconds = min(10.0, max(0.2, after_seconds / 6))
        self.batch = max(1, int(qps * self.idle_seconds))  # about one idle period's worth of calls

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                due = await self.rt.store.receipts_due(self.after_seconds, self.batch)
            except (DatabaseUnavailable, psycopg.Error) as exc:
                log.warning("receipt polling: database unavailable", extra={"error": failure_name(exc)})
                due = []
            for send in due:
                if stop.is_set():
                    return
                await self._ask(send)
                await _sleep_unless(stop, self.interval)
            if len(due) < self.batch:
                await _sleep_unless(stop, self.idle_seconds)

    async def _ask(self, send: ReceiptDue) -> None:
        m = self.rt.metrics
        try:
            receipt = await self.rt.provider.query_receipt(send.phone, send.biz_id, send.sent_at, QUERY_SECONDS)
        except Exception as exc:  # a ProviderError's text is safe; others are named by class only
            m.receipt_polls.labels("error").inc()
            log.warning("receipt polling: QuerySendDetails failed",
                        extra={"delivery_id": send.delivery_id, "error": failure_name(exc)})  # fmt: skip
            return
        if receipt is None:
            m.receipt_polls.labels("pending").inc()
            return
        m.receipt_polls.labels("receipt").inc()
        receipt = dataclasses.replace(receipt, out_id=str(send.delivery_id))  # asked by its BizId, which stays checked
        try:
            stored = await self.rt.store.record_receipts([receipt], "query", timeout=5.0)
        except (DatabaseUnavailable, psycopg.Error) as exc:  # asked again after the next interval
            log.warning("receipt polling: not stored", extra={"delivery_id": send.delivery_id,
                                                              "error": failure_name(exc)})  # fmt: skip
            return
        observe_receipts(m, stored)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
