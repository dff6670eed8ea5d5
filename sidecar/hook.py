"""The Send SMS hook endpoint: GoTrue's signed event in, one SMS out, an answer GoTrue understands.

Answers (see gotrue-send-sms-hook.md §6):
- success is always 200 + application/json + `{}`, the one response every GoTrue version accepts;
- a failure is `200 {"error": {"http_code", "message"}}` when the event has `metadata` (GoTrue
  >= 2.187 shows it to the user), else a non-2xx status (older versions take that error object
  for success). Never 429/503, which GoTrue retries or turns into "Service unavailable".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sidecar.db import ApiError
from sidecar.errors import DatabaseUnavailable, failure_name
from sidecar.logs import mask_phone
from sidecar.outcomes import BUSY, DATABASE_UNAVAILABLE, NO_TIME_LEFT, Kind, Outcome, SendResult
from sidecar.providers.base import Busy
from sidecar.request_body import read_limited, strict_json
from sidecar.runtime import Runtime
from sidecar.store import Duplicate, Finished, HookSend, MessageStatus
from sidecar.webhook import WebhookVerificationError

__all__ = ["BUDGET_SECONDS", "HTTP_STATUS", "MAX_BODY_BYTES", "send_sms_hook", "user_message"]

log = logging.getLogger("sidecar.hook")

BUDGET_SECONDS = 4.0  # GoTrue allows 5 s for everything, retries included
MAX_BODY_BYTES = 64 * 1024  # a real event is about 1-2 KB
MIN_RETRY_BUDGET = 1.2  # seconds left that make a second attempt after a connect failure worthwhile
# Without `metadata` the GoTrue version may ignore error objects, so the status itself must fail;
# these two would be retried or misreported.
_LEGACY_STATUS = {429: 403, 503: 502}
# What GoTrue is told, by what went wrong (the status also picks the user's text).
HTTP_STATUS = {Kind.BAD_NUMBER: 400, Kind.RATE_LIMITED: 429, Kind.PROVIDER_ERROR: 502, Kind.UNAVAILABLE: 503,
               Kind.TIMEOUT: 504, Kind.NEEDS_OPERATOR: 500}  # fmt: skip


@dataclass
class _Failure(Exception):
    status: int
    message: str
    reason: str


def _answer(has_metadata: bool, failure: _Failure) -> Response:
    body = {"error": {"http_code": failure.status, "message": failure.message}}
    if has_metadata:
        return JSONResponse(body, status_code=200)
    return JSONResponse(body, status_code=_LEGACY_STATUS.get(failure.status, failure.status))


def _essentials(event: Any) -> Any:
    """Only the fields the database reads, keeping the payload's shape (which tells GoTrue's version).

    The rest (user_metadata above all) is the user's to fill: NUL characters or deep nesting there
    must not keep anyone from getting a code, and need not travel to the database.
    """
    if not isinstance(event, dict):
        return event
    kept: dict[str, Any] = {k: event[k] for k in ("otp", "phone") if k in event}
    for name, fields in (("metadata", ("uuid", "ip_address")), ("user", ("phone",)),
                         ("sms", ("otp", "phone", "sms_type"))):  # fmt: skip
        part = event.get(name)
        if isinstance(part, dict):
            kept[name] = {k: part[k] for k in fields if k in part}
    return kept


async def send_sms_hook(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    has_metadata = False
    outcome = "error"
    try:
        try:
            async with asyncio.timeout(BUDGET_SECONDS / 2):
                body = await read_limited(request, MAX_BODY_BYTES)
        except TimeoutError:
            raise _Failure(408, "request body too slow", "slow_body") from None
        if body is None:
            raise _Failure(413, "payload too large", "too_large")
        try:
            if rt.verifier is None:
                raise WebhookVerificationError("no hook secret configured")
            rt.verifier.verify(request.headers, body)
        except WebhookVerificationError as exc:
            raise _Failure(401, "invalid webhook signature", "signature") from exc
        try:
            event = strict_json(body)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python parses
            raise _Failure(400, "the hook payload is not JSON", "invalid_payload") from None
        has_metadata = isinstance(event, dict) and isinstance(event.get("metadata"), dict)
        outcome = await _deliver(rt, _essentials(event), hashlib.sha256(body).hexdigest(), deadline)
        return Response(b"{}", media_type="application/json")  # what every GoTrue version reads as success
    except _Failure as failure:
        outcome = failure.reason
        rt.metrics.hook_rejections.labels(failure.reason).inc()
        return _answer(has_metadata, failure)
    finally:
        rt.metrics.hook_requests.labels(outcome).inc()
        rt.metrics.hook_latency.observe(time.monotonic() - started)


async def _deliver(rt: Runtime, event: Any, body_sha256: str, deadline: float) -> str:
    """Returns the metrics outcome of a success; raises _Failure otherwise."""
    begin = await _begin(rt, event, body_sha256, deadline)
    if isinstance(begin, Duplicate):
        return await _settle_duplicate(rt, begin, deadline)

    while True:
        result, latency_ms = await _send(rt, begin, deadline)
        remaining = deadline - time.monotonic()
        retry_now = result.connect_failure and begin.attempt == 1 and remaining > MIN_RETRY_BUDGET
        await _finish(rt, begin.delivery_id, result, latency_ms, max_attempts=2 if retry_now else 1,
                      deadline=deadline)  # fmt: skip
        _log_result(rt, begin, result, latency_ms)
        if result.accepted:
            return "sent"
        if not retry_now:
            raise _failure(result, "provider_error")
        # Nothing reached the provider, so the same message can go again (hook_begin re-leases it).
        begin = await _begin(rt, event, body_sha256, deadline)
        if isinstance(begin, Duplicate):
            return await _settle_duplicate(rt, begin, deadline)


def _failure(result: SendResult, reason: str) -> _Failure:
    return _Failure(_http_status(result.kind), user_message(result), reason)


def _http_status(kind: Kind | None) -> int:
    return 500 if kind is None else HTTP_STATUS[kind]


_DATABASE_DOWN = SendResult(Outcome.RETRY, DATABASE_UNAVAILABLE, kind=Kind.UNAVAILABLE)


async def _begin(rt: Runtime, event: Any, body_sha256: str, deadline: float) -> HookSend | Duplicate:
    item = {"event": event, "body_sha256": body_sha256}
    try:
        with _database_failures():
            return await rt.store.begin_hook(item, deadline)
    except ApiError as exc:
        reason = "rate_limited" if exc.status == 429 else exc.code or "invalid_payload"
        raise _Failure(exc.status, exc.message, reason) from None


@contextmanager
def _database_failures() -> Iterator[None]:
    """What keeps the database from answering becomes the hook's failure."""
    try:
        yield
    except psycopg.DataError:
        # SQLSTATE class 22: a value Postgres cannot hold (a NUL, a bad surrogate), not an outage.
        raise _Failure(400, "the hook payload holds a value that is not valid text", "invalid_payload") from None
    except (DatabaseUnavailable, psycopg.Error) as exc:
        log.error("database unavailable for the hook", extra={"error": failure_name(exc)})
        raise _failure(_DATABASE_DOWN, "database") from None


async def _send(rt: Runtime, begin: HookSend, deadline: float) -> tuple[SendResult, int]:
    # Leave time to record the result and answer; the provider abandons the call at its deadline.
    remaining = deadline - time.monotonic() - 0.3
    if remaining < 0.2:
        return SendResult(Outcome.RETRY, NO_TIME_LEFT, "hook budget spent before sending", kind=Kind.UNAVAILABLE,
                          connect_failure=True), 0  # fmt: skip
    started = time.monotonic()
    try:
        async with rt.in_flight.hook():
            result = await rt.provider.send(begin.sms(), remaining)
    except Busy:
        # Every send slot is taken: say so now rather than wait out GoTrue's budget in a queue.
        result = SendResult(Outcome.RETRY, BUSY, "too many SMS in flight in this sidecar", kind=Kind.UNAVAILABLE,
                            connect_failure=True)  # fmt: skip
    elapsed = time.monotonic() - started
    rt.metrics.provider_latency.labels(rt.provider.name).observe(elapsed)
    rt.metrics.provider_results.labels(rt.provider.name, result.code).inc()
    return result, int(elapsed * 1000)


async def _finish(
    rt: Runtime, delivery_id: int, result: SendResult, latency_ms: int, max_attempts: int, deadline: float
) -> None:
    # Recording must not be skipped because the budget ran low: give it a little extra time.
    item = Finished(delivery_id, result, rt.provider.name, latency_ms, retry_in_seconds=0, max_attempts=max_attempts)
    try:
        await rt.store.finish(item, timeout=max(deadline - time.monotonic(), 1.0))
    except (DatabaseUnavailable, psycopg.Error) as exc:
        log.error("could not record a delivery result", extra={"delivery_id": delivery_id, "error": failure_name(exc)})
        if result.accepted:
            return  # the SMS did go out; the user must not be told otherwise
        raise _failure(_DATABASE_DOWN, "database") from None


async def _settle_duplicate(rt: Runtime, begin: Duplicate, deadline: float) -> str:
    """The same event again: answer with the first delivery's outcome, never send twice."""
    with _database_failures():
        # Looks again until deadline - 0.2 s, the last look answering by the deadline.
        state = await rt.store.wait_for_state(begin.message_id, lambda s: s.status != MessageStatus.SENDING,
                                              until=deadline - 0.15, deadline=deadline, poll=0.05,
                                              known=begin.state, max_timeout=BUDGET_SECONDS)  # fmt: skip
    if state.status == MessageStatus.SENT:
        return "duplicate"
    if state.status == MessageStatus.SENDING:
        raise _failure(SendResult(Outcome.AMBIGUOUS, state.provider_code, kind=Kind.TIMEOUT), "duplicate_in_flight")
    raise _failure(rt.provider.classify(state.provider_code, state.error), "duplicate_failed")


def _log_result(rt: Runtime, begin: HookSend, result: SendResult, latency_ms: int) -> None:
    fields = {
        "phone": mask_phone(begin.phone),
        "delivery_id": begin.delivery_id,
        "shape": begin.shape,
        "purpose": begin.purpose,
        "provider": rt.provider.name,
        "provider_code": result.code,
        "biz_id": result.biz_id,
        "request_id": result.request_id,
        "latency_ms": latency_ms,
    }
    if result.accepted:
        log.info("hook SMS accepted", extra=fields)
    elif result.alert:
        log.critical("hook SMS refused: operator action needed: %s", result.message, extra=fields)
    else:
        log.warning("hook SMS not sent", extra={**fields, "provider_message": result.message})


def user_message(result: SendResult) -> str:
    """Short text for the end user, in English and Chinese, by what went wrong."""
    if result.kind is Kind.RATE_LIMITED:
        wait = result.retry_after or 60
        return (
            f"Too many codes sent to this number, try again in {_human(wait)}. "
            f"该号码验证码发送过于频繁，请{_human(wait, _ZH)}后再试。"
        )
    if result.kind is Kind.BAD_NUMBER:
        return "This phone number cannot receive SMS codes. 该手机号码无法接收短信验证码。"
    if result.kind is Kind.TIMEOUT:
        return "The SMS service did not answer in time, please try again. 短信服务响应超时，请重试。"
    if result.kind in (Kind.PROVIDER_ERROR, Kind.UNAVAILABLE):
        return "The SMS service is temporarily unavailable, please try again. 短信服务暂时不可用，请稍后重试。"
    return "SMS sending is not available right now. 短信服务暂不可用，请稍后再试。"


_EN, _ZH = ("{} h", "{} min", "{} s"), (" {} 小时", " {} 分钟", " {} 秒")


def _human(seconds: int, units: tuple[str, str, str] = _EN) -> str:
    """`seconds` rounded up to hours or minutes, in `units` (hours, minutes, seconds)."""
    if seconds >= 3600:
        return units[0].format(-(-seconds // 3600))
    if seconds >= 60:
        return units[1].format(-(-seconds // 60))
    return units[2].format(seconds)
