"""What every SMS provider offers: send one verification code, and say what happened.

Providers are asynchronous: a send occupies no thread, only a slot of the in-flight limit
(`InFlight`), so the number of sends under way is a setting, not the size of a thread pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sidecar.outcomes import SendResult

__all__ = ["Busy", "InFlight", "Provider", "Receipt", "Sms"]


@dataclass(frozen=True)
class Sms:
    phone: str  # E.164 digits without +
    code: str
    out_id: str  # our ledger id, echoed in delivery receipts
    sign_name: str | None = None  # per-purpose override (sms.templates) for mainland numbers
    template_code: str | None = None


@dataclass(frozen=True)
class Receipt:
    """The carrier's verdict on one SMS, pushed by Aliyun (SmsReport) or asked for (QuerySendDetails)."""

    out_id: str | None  # our ledger id, as the send carried it
    biz_id: str
    phone: str  # as Aliyun writes it; matched against the send, never stored
    success: bool
    code: str  # DELIVERED, or the carrier's code
    message: str
    report_time: datetime  # aware
    send_time: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """What sms.record_receipts reads."""
        return {"out_id": self.out_id, "biz_id": self.biz_id, "phone": self.phone, "success": self.success,
                "code": self.code, "message": self.message, "report_time": self.report_time.isoformat(),
                "send_time": None if self.send_time is None else self.send_time.isoformat()}  # fmt: skip


class Provider(Protocol):
    name: str

    async def start(self) -> None:
        """Open what the sends share (connections); called once, in the event loop that will send."""
        ...

    async def close(self) -> None: ...

    async def send(self, sms: Sms, timeout: float) -> SendResult:
        """Send within `timeout` seconds, the whole call. Never raises for provider or network failures:
        one that has not answered in time is abandoned and reported AMBIGUOUS (or RETRY with
        `connect_failure` when it provably never reached the provider)."""
        ...

    async def find_sent(self, phone: str, out_ids: list[str], since: datetime, timeout: float) -> SendResult | None:
        """After an ambiguous attempt: the provider's record of a send with one of these OutIds, if any.

        Raises (a ProviderError, whose text is safe to store) when the provider cannot be asked.
        """
        ...

    async def query_receipt(self, phone: str, biz_id: str, sent_at: datetime, timeout: float) -> Receipt | None:
        """The carrier's verdict on the send `biz_id` made at `sent_at`, None while there is none yet.

        Raises (a ProviderError, whose text is safe to store) when the provider cannot be asked.
        """
        ...

    def classify(self, code: str, message: str) -> SendResult:
        """A failure stored earlier (its code and text, from sms.message_state) read back as a result."""
        ...


class Busy(Exception):
    """No send slot is free right now."""


class InFlight:
    """The in-flight limit, shared by the hook and the delivery worker, with the hook first.

    The hook (GoTrue is waiting) never queues for a slot: when none is free it is told at once and
    answers with an error, instead of waiting out its budget. The worker waits for a slot, and may
    hold at most `worker_share` of them, so a backlog being drained can never crowd out logins.
    """

    def __init__(self, limit: int, worker_share: float = 0.75) -> None:
        self.limit = limit
        self.worker_limit = max(1, int(limit * worker_share))
        self._all = asyncio.Semaphore(limit)
        self._worker = asyncio.Semaphore(self.worker_limit)

    @asynccontextmanager
    async def hook(self) -> AsyncIterator[None]:
        if self._all.locked():
            raise Busy
        await self._all.acquire()  # free now: returns without waiting
        try:
            yield
        finally:
            self._all.release()

    @asynccontextmanager
    async def worker(self) -> AsyncIterator[None]:
        async with self._worker, self._all:
            yield
