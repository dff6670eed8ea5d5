"""The delivery worker: drains sms.outbox through the provider, inside `sms-sidecar serve`.

It wakes on NOTIFY sms_outbox (a queued code reaches the provider within milliseconds) and sweeps
on a timer for whatever arrived while it was not listening. Claims use `for update skip locked`
and leases, so any number of replicas share one queue and a crashed one's messages come back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from datetime import UTC, datetime

import psycopg

from sidecar.config import WorkerConfig
from sidecar.errors import DatabaseUnavailable, failure_name
from sidecar.logs import mask_phone
from sidecar.outcomes import RECONCILE_FAILED, SHUTDOWN_DURING_SEND, WORKER_ERROR, Kind, Outcome, SendResult
from sidecar.providers.errors import describe_failure
from sidecar.runtime import Runtime
from sidecar.store import ClaimedMessage, Finished, MessageStatus

__all__ = ["DeliveryWorker"]

log = logging.getLogger("sidecar.worker")

SEND_SECONDS = 10.0  # the whole call; below the lease (30 s), so a lease never ends mid-send
RECONCILE_SECONDS = 10.0
RECEIPT_STATS_SECONDS = 60.0  # sms.receipt_stats reads half an hour of sends: not on every sweep


class DeliveryWorker:
    def __init__(self, rt: Runtime, config: WorkerConfig, *, backoff_cap: float = 300.0) -> None:
        self.rt = rt
        # The worker's share of the in-flight limit caps it too (the hook keeps the rest).
        self.concurrency = min(config.concurrency, rt.in_flight.worker_limit)
        self.lease_seconds = config.lease_seconds
        self.sweep_seconds = config.sweep_seconds
        self.max_attempts = config.max_attempts
        self.backoff_base = config.backoff_seconds
        self.backoff_cap = backoff_cap
        self.shutdown_grace = 12.0
        self._in_flight: dict[asyncio.Task[None], ClaimedMessage] = {}
        self._started: set[int] = set()  # delivery ids whose send has begun: the provider may have them
        self._wake = asyncio.Event()
        self._gauges_at = 0.0
        self._receipt_stats_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen(stop), name="sms-outbox-listen")
        try:
            while not stop.is_set():
                try:
                    await self._drain(stop)
                    # Not on every wake-up: at hundreds of codes a second that query would dominate.
                    if time.monotonic() - self._gauges_at >= self.sweep_seconds:
                        self._gauges_at = time.monotonic()
                        await self._update_gauges()
                except (DatabaseUnavailable, psycopg.Error) as exc:
                    log.warning("outbox unavailable, retrying", extra={"error": failure_name(exc)})
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.sweep_seconds)
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            listener.cancel()
            await self._shutdown()

    async def _listen(self, stop: asyncio.Event) -> None:
        """Holds a LISTEN connection, reconnecting (and sweeping, via the wake-up) after any loss."""
        delay = 0.5
        while not stop.is_set():
            try:
                # The first wake-up is for anything queued while we were away, the others for NOTIFYs.
                async for _ in self.rt.store.outbox_notifications():
                    delay = 0.5
                    self._wake.set()
            except (DatabaseUnavailable, psycopg.Error) as exc:
                log.warning("LISTEN connection lost", extra={"error": failure_name(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _drain(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                # Wait for a slot rather than claim messages nobody can start on.
                await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                continue
            claimed = await self.rt.store.claim_messages(free, self.lease_seconds)
            for message in claimed:
                task = asyncio.create_task(self._deliver(message))
                self._in_flight[task] = message
                task.add_done_callback(lambda t: self._in_flight.pop(t, None))
            if len(claimed) < free:
                return

    async def _deliver(self, message: ClaimedMessage) -> None:
        started = time.monotonic()
        try:
            result = None
            if message.needs_reconcile:
                result = await self._reconcile(message)
            if result is None:
                async with self.rt.in_flight.worker():
                    self._started.add(message.delivery_id)
                    result = await self.rt.provider.send(message.sms(), SEND_SECONDS)
        except Exception as exc:  # a provider bug must not kill the worker or lose the message
            # No traceback: exception texts from an HTTP stack quote the request URL, phone and code included.
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
            fields = {"delivery_id": message.delivery_id, "error": type(exc).__name__, "where": where}
            log.error("delivery raised", extra=fields)
            result = SendResult(Outcome.AMBIGUOUS, WORKER_ERROR, describe_failure(exc)[1], kind=Kind.NEEDS_OPERATOR)
        latency_ms = int((time.monotonic() - started) * 1000)
        status = await self._finish(message, result, latency_ms)
        self._started.discard(message.delivery_id)
        self._observe(message, result, status, latency_ms)

    async def _reconcile(self, message: ClaimedMessage) -> SendResult | None:
        """An earlier attempt may have gone out: ask the provider before sending again."""
        out_ids = [str(i) for i in message.ambiguous_delivery_ids]
        try:
            found = await self.rt.provider.find_sent(message.phone, out_ids, message.created_at, RECONCILE_SECONDS)
        except Exception as exc:  # the text is built from the error's class, never from its message
            return SendResult(Outcome.AMBIGUOUS, RECONCILE_FAILED, describe_failure(exc)[1], kind=Kind.UNAVAILABLE)
        if found is not None:
            log.info("ambiguous attempt found delivered; not resending", extra={"delivery_id": message.delivery_id})
        return found

    def _retry_in(self, attempt: int, result: SendResult) -> int:
        if result.retry_after:
            return result.retry_after
        # Exponential backoff with full jitter, so a provider outage does not end in a thundering herd.
        return int(random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))) + 1

    async def _finish(self, message: ClaimedMessage, result: SendResult, latency_ms: int) -> str:
        item = Finished(message.delivery_id, result, self.rt.provider.name, latency_ms,
                        retry_in_seconds=self._retry_in(message.attempt, result),
                        max_attempts=self.max_attempts)  # fmt: skip
        # The result must be recorded; if the database is briefly away, keep trying while the lease lasts.
        deadline = time.monotonic() + self.lease_seconds
        while True:
            try:
                return await self.rt.store.finish(item, timeout=5.0)
            except DatabaseUnavailable as exc:
                if time.monotonic() > deadline:
                    log.error("could not record a delivery; its lease will expire and it will be reconciled",
                              extra={"delivery_id": message.delivery_id, "error": failure_name(exc)})  # fmt: skip
                    return MessageStatus.UNKNOWN
                await asyncio.sleep(0.5)

    def _observe(self, message: ClaimedMessage, result: SendResult, status: str, latency_ms: int) -> None:
        m = self.rt.metrics
        m.provider_results.labels(self.rt.provider.name, result.code).inc()
        m.provider_latency.labels(self.rt.provider.name).observe(latency_ms / 1000)
        fields = {"phone": mask_phone(message.phone), "delivery_id": message.delivery_id,
                  "attempt": message.attempt, "source": message.source, "provider_code": result.code,
                  "status": status, "latency_ms": latency_ms, "biz_id": result.biz_id}  # fmt: skip
        if result.accepted:
            m.delivery_latency.observe((datetime.now(UTC) - message.created_at).total_seconds())
            log.info("SMS accepted", extra=fields)
        elif status == MessageStatus.QUEUED:
            m.delivery_retries.labels(result.code).inc()
            log.warning("SMS not sent, will retry", extra={**fields, "provider_message": result.message})
        else:
            m.delivery_failures.labels(result.code).inc()
            level = logging.CRITICAL if result.alert else logging.WARNING
            log.log(level, "SMS failed: %s", result.message, extra=fields)

    async def _update_gauges(self) -> None:
        m = self.rt.metrics
        stats = await self.rt.store.queue_stats(timeout=5.0)
        m.queue_depth.set(stats.queued)
        m.queue_oldest.set(stats.oldest_queued_seconds)
        # Only where receipts arrive: elsewhere "none delivered" would be a false alarm.
        if self.rt.config.receipts and time.monotonic() - self._receipt_stats_at >= RECEIPT_STATS_SECONDS:
            self._receipt_stats_at = time.monotonic()
            receipts = await self.rt.store.receipt_stats(timeout=10.0)
            m.receipt_window_sent.set(receipts.sent)
            sent = receipts.sent or 1  # no sends: every share is 0
            for minutes, delivered in receipts.delivered_within.items():
                m.delivered_within.labels(str(minutes)).set(delivered / sent)
            m.undelivered.set(receipts.undelivered / sent)

    async def _shutdown(self) -> None:
        """Stop claiming; let sends in flight finish; hand back whatever has not started."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=self.shutdown_grace)
        unfinished = list(self._in_flight.items())
        for task, _ in unfinished:
            task.cancel()
        for _, message in unfinished:
            if message.delivery_id in self._started:
                # The provider may have it: queue it again behind a reconcile rather than resend blindly.
                result = SendResult(Outcome.AMBIGUOUS, SHUTDOWN_DURING_SEND, "the sidecar stopped mid-send",
                                    kind=Kind.UNAVAILABLE)  # fmt: skip
                await self._finish(message, result, 0)
        try:
            released = await self.rt.store.release_messages(timeout=5.0)
            if released:
                log.info("released claimed messages", extra={"count": released})
        except Exception as exc:  # the leases expire on their own if the database is gone
            log.warning("could not release claimed messages", extra={"error": failure_name(exc)})
