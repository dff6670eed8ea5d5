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
from enum import StrEnum
from typing import Protocol

__all__ = ["Busy", "InFlight", "Outcome", "Provider", "SendResult", "Sms", "user_message"]


class Outcome(StrEnum):
    """The ledger's outcomes (sms.finish_delivery)."""

    ACCEPTED = "accepted"  # the provider took it; delivery is asynchronous
    REJECTED = "rejected"  # permanent: bad number, template or configuration; never resend
    RETRY = "retry"  # transient and known not sent (or refused): safe to try again later
    AMBIGUOUS = "ambiguous"  # may have been sent (read timeout, dropped reply): reconcile first


@dataclass(frozen=True)
class Sms:
    phone: str  # E.164 digits without +
    code: str
    out_id: str  # our ledger id, echoed in delivery receipts
    sign_name: str | None = None  # per-purpose override (sms.templates) for mainland numbers
    template_code: str | None = None


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    code: str  # the provider's result code, e.g. OK or isv.BUSINESS_LIMIT_CONTROL
    message: str = ""
    biz_id: str | None = None
    request_id: str | None = None
    status: int = 200  # what the person waiting for the code should get, as an HTTP status
    retry_after: int | None = None  # seconds, when the provider says how long to wait
    connect_failure: bool = False  # nothing reached the provider, so resending cannot duplicate
    alert: bool = False  # an operator must act (credentials, balance, sign or template)

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED


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


def user_message(result: SendResult) -> str:
    """Short text for the end user, in English and Chinese, by what went wrong."""
    if result.status == 429:
        wait = result.retry_after or 60
        return (
            f"Too many codes sent to this number, try again in {_human(wait)}. "
            f"该号码验证码发送过于频繁，请{_human_zh(wait)}后再试。"
        )
    if result.status == 400:
        return "This phone number cannot receive SMS codes. 该手机号码无法接收短信验证码。"
    if result.status == 504:
        return "The SMS service did not answer in time, please try again. 短信服务响应超时，请重试。"
    if result.status in (502, 503):
        return "The SMS service is temporarily unavailable, please try again. 短信服务暂时不可用，请稍后重试。"
    return "SMS sending is not available right now. 短信服务暂不可用，请稍后再试。"


def _human(seconds: int) -> str:
    if seconds >= 3600:
        return f"{-(-seconds // 3600)} h"
    if seconds >= 60:
        return f"{-(-seconds // 60)} min"
    return f"{seconds} s"


def _human_zh(seconds: int) -> str:
    if seconds >= 3600:
        return f" {-(-seconds // 3600)} 小时"
    if seconds >= 60:
        return f" {-(-seconds // 60)} 分钟"
    return f" {seconds} 秒"
