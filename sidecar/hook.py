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
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sidecar.db import ApiError, call
from sidecar.logs import mask_phone
from sidecar.providers.aliyun import classify_business_error
from sidecar.providers.base import Busy, Outcome, SendResult, Sms, user_message
from sidecar.results import Finished
from sidecar.runtime import Runtime
from sidecar.webhook import WebhookVerificationError

__all__ = ["BUDGET_SECONDS", "MAX_BODY_BYTES", "send_sms_hook"]

log = logging.getLogger("sidecar.hook")

BUDGET_SECONDS = 4.0  # GoTrue allows 5 s for everything, retries included
MAX_BODY_BYTES = 64 * 1024  # a real event is about 1-2 KB
MIN_RETRY_BUDGET = 1.2  # seconds left that make a second attempt after a connect failure worthwhile
# Without `metadata` the GoTrue version may ignore error objects, so the status itself must fail;
# these two would be retried or misreported.
_LEGACY_STATUS = {429: 403, 503: 502}


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


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _Failure(413, "payload too large", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Failure(413, "payload too large", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


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
                body = await _read_body(request)
        except TimeoutError:
            raise _Failure(408, "request body too slow", "slow_body") from None
        try:
            if rt.verifier is None:
                raise WebhookVerificationError("no hook secret configured")
            rt.verifier.verify(request.headers, body)
        except WebhookVerificationError as exc:
            raise _Failure(401, "invalid webhook signature", "signature") from exc
        try:
            event = json.loads(body, parse_constant=_reject_constant)
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
    if begin["action"] == "duplicate":
        return await _settle_duplicate(rt, begin, deadline)

    while True:
        result, latency_ms = await _send(rt, begin, deadline)
        remaining = deadline - time.monotonic()
        retry_now = result.connect_failure and begin["attempt"] == 1 and remaining > MIN_RETRY_BUDGET
        await _finish(rt, begin["delivery_id"], result, latency_ms, max_attempts=2 if retry_now else 1,
                      deadline=deadline)  # fmt: skip
        _log_result(rt, begin, result, latency_ms)
        if result.accepted:
            return "sent"
        if not retry_now:
            raise _Failure(result.status, user_message(result), "provider_error")
        # Nothing reached the provider, so the same message can go again (hook_begin re-leases it).
        begin = await _begin(rt, event, body_sha256, deadline)
        if begin["action"] != "send":
            return await _settle_duplicate(rt, begin, deadline)


async def _begin(rt: Runtime, event: Any, body_sha256: str, deadline: float) -> dict[str, Any]:
    """sms.hook_begin, in a statement shared with the requests that begin meanwhile (sidecar/batches.py)."""
    item = {"event": event, "body_sha256": body_sha256}
    answer: dict[str, Any] = await _db(rt.begins.submit(item, deadline - time.monotonic()), deadline)
    if answer["action"] == "refused":
        exc = ApiError.from_parts(answer["error"], answer["meta"])
        reason = "rate_limited" if exc.status == 429 else exc.code or "invalid_payload"
        raise _Failure(exc.status, exc.message, reason)
    return answer


async def _db(work: Awaitable[Any], deadline: float) -> Any:
    """`work` (a statement) by the deadline; what keeps it from answering becomes the hook's failure."""
    try:
        async with asyncio.timeout(deadline - time.monotonic()):  # no extra task per call, unlike wait_for
            return await work
    except psycopg.DataError:
        # SQLSTATE class 22: a value Postgres cannot hold (a NUL, a bad surrogate), not an outage.
        raise _Failure(400, "the hook payload holds a value that is not valid text", "invalid_payload") from None
    except (TimeoutError, PoolTimeout, psycopg.Error) as exc:
        log.error("database unavailable for the hook", extra={"error": type(exc).__name__})
        raise _Failure(503, user_message(SendResult(Outcome.RETRY, "DatabaseUnavailable", status=503)),
                       "database") from None  # fmt: skip


async def _send(rt: Runtime, begin: dict[str, Any], deadline: float) -> tuple[SendResult, int]:
    sms = Sms(phone=begin["phone"], code=begin["code"], out_id=str(begin["delivery_id"]),
              sign_name=begin["sign_name"], template_code=begin["template_code"])  # fmt: skip
    # Leave time to record the result and answer; the provider abandons the call at its deadline.
    remaining = deadline - time.monotonic() - 0.3
    if remaining < 0.2:
        return SendResult(Outcome.RETRY, "NoTimeLeft", "hook budget spent before sending", status=503,
                          connect_failure=True), 0  # fmt: skip
    started = time.monotonic()
    try:
        async with rt.in_flight.hook():
            result = await rt.provider.send(sms, remaining)
    except Busy:
        # Every send slot is taken: say so now rather than wait out GoTrue's budget in a queue.
        result = SendResult(Outcome.RETRY, "Busy", "too many SMS in flight in this sidecar", status=503,
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
        await rt.results.finish(item, timeout=max(deadline - time.monotonic(), 1.0))
    except (TimeoutError, PoolTimeout, psycopg.Error, OSError) as exc:
        log.error("could not record a delivery result", extra={"delivery_id": delivery_id, "error": type(exc).__name__})
        if result.accepted:
            return  # the SMS did go out; the user must not be told otherwise
        raise _Failure(503, user_message(SendResult(Outcome.RETRY, "DatabaseUnavailable", status=503)),
                       "database") from None  # fmt: skip


async def _settle_duplicate(rt: Runtime, begin: dict[str, Any], deadline: float) -> str:
    """The same event again: answer with the first delivery's outcome, never send twice."""
    state = begin
    while state["status"] == "sending" and time.monotonic() < deadline - 0.2:
        await asyncio.sleep(0.05)
        query = call(rt.pool, "select sms.message_state(%(id)s)", {"id": begin["message_id"]},
                     timeout=deadline - time.monotonic())  # fmt: skip
        state = await _db(query, deadline)
    status, code, error = state["status"], state["provider_code"] or "", state["error"] or ""
    if status == "sent":
        return "duplicate"
    if status == "sending":
        raise _Failure(504, user_message(SendResult(Outcome.AMBIGUOUS, code, status=504)), "duplicate_in_flight")
    failed = _status_for(code, error)
    raise _Failure(failed.status, user_message(failed), "duplicate_failed")


def _status_for(code: str, message: str) -> SendResult:
    if code.startswith(("isv.", "isp.")):
        return classify_business_error(code, message)
    status = {"NoResponse": 504, "ConnectFailed": 503, "BadGateway": 502, "EXPIRED": 504}.get(code, 500)
    return SendResult(Outcome.REJECTED, code, message, status=status)


def _log_result(rt: Runtime, begin: dict[str, Any], result: SendResult, latency_ms: int) -> None:
    fields = {
        "phone": mask_phone(begin["phone"]),
        "delivery_id": begin["delivery_id"],
        "shape": begin["shape"],
        "purpose": begin["purpose"],
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
