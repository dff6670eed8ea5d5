"""Aliyun's delivery receipts in: `POST /aliyun/sms-report/{token}` (SmsReport "HTTP batch push").

Aliyun signs nothing (aliyun-sms.md §13), so the secret path segment ALIYUN_SMS_REPORT_TOKEN is the
only lock: any other token, or none configured, gets the same 404 as a path that does not exist.
A push is a JSON array of receipts; it is stored in one statement (sms.record_receipts) and then
acknowledged with `200 {"code": 0}`. Receipts that are not ours are acknowledged too, or Aliyun
would push them again for hours; a body that is not a receipt array is a 400; only a push that
could not be stored answers 5xx, which Aliyun retries.
"""

from __future__ import annotations

import hmac
import logging
import re
from datetime import datetime
from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, request_response
from starlette.types import Receive, Scope, Send

from sidecar.errors import DatabaseUnavailable, failure_name
from sidecar.metrics import Metrics
from sidecar.providers.aliyun import CHINA
from sidecar.providers.base import Receipt
from sidecar.request_body import read_limited, strict_json
from sidecar.runtime import Runtime
from sidecar.store import StoredReceipts

__all__ = ["MAX_RECEIPTS", "MAX_REPORT_BYTES", "InvalidReport", "observe_receipts", "parse_receipts", "report_route"]

log = logging.getLogger("sidecar.receipts")

MAX_REPORT_BYTES = 4 * 1024 * 1024  # a receipt is about 300 bytes: thousands per push
MAX_RECEIPTS = 10_000
_CODE_LABEL = re.compile(r"^[A-Za-z0-9:._-]{1,24}$")  # carrier codes become metric labels only in this shape


class InvalidReport(ValueError):
    """The body is not a receipt array; the message says where, never what a field held."""


def _text(item: dict[str, Any], name: str, index: int, *, required: bool = False) -> str | None:
    value = item.get(name)
    if value is None or value == "":
        if required:
            raise InvalidReport(f"receipt {index}: {name} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidReport(f"receipt {index}: {name} must be a string")
    if isinstance(value, str) and ("\x00" in value or len(value) > 1000):
        raise InvalidReport(f"receipt {index}: {name} is not a short text")
    return str(value)


def _time(item: dict[str, Any], name: str, index: int, *, required: bool = False) -> datetime | None:
    text = _text(item, name, index, required=required)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)  # Aliyun's "2017-02-02 22:23:22", and ISO forms
    except ValueError:
        raise InvalidReport(f"receipt {index}: {name} is not a time such as 2017-02-02 22:23:22") from None
    return (
        moment if moment.tzinfo is not None else moment.replace(tzinfo=CHINA)
    )  # Aliyun writes China time without a zone


def _success(item: dict[str, Any], index: int) -> bool:
    value = item.get("success")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidReport(f"receipt {index}: success must be true or false")


def parse_receipts(body: bytes) -> list[Receipt]:
    """A push's receipts, or InvalidReport: all of them or none, so nothing half-stored is acknowledged."""
    try:
        items = strict_json(body)
    except (ValueError, RecursionError):
        raise InvalidReport("the body is not JSON") from None
    if not isinstance(items, list):
        raise InvalidReport("the body must be a JSON array of receipts")
    if len(items) > MAX_RECEIPTS:
        raise InvalidReport(f"at most {MAX_RECEIPTS} receipts per push")
    receipts = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidReport(f"receipt {index} is not an object")
        report_time = _time(item, "report_time", index, required=True)
        assert report_time is not None
        receipts.append(Receipt(
            out_id=_text(item, "out_id", index),
            biz_id=_text(item, "biz_id", index, required=True) or "",
            phone=_text(item, "phone_number", index) or "",
            success=_success(item, index),
            code=_text(item, "err_code", index) or "",
            message=_text(item, "err_msg", index) or "",
            report_time=report_time,
            send_time=_time(item, "send_time", index),
        ))  # fmt: skip
    return receipts


def observe_receipts(metrics: Metrics, stored: StoredReceipts) -> None:
    for change in stored.changed:
        result = "delivered" if change.delivered else "undelivered"
        code = change.code if change.code and _CODE_LABEL.match(change.code) else "other"
        metrics.receipts.labels(result, code).inc()
        if change.latency_ms is not None:
            metrics.receipt_latency.labels(result).observe(change.latency_ms / 1000)
    if stored.repeated:
        metrics.receipts.labels("repeated", "").inc(stored.repeated)
    if stored.unknown:
        metrics.receipts.labels("unknown", "").inc(stored.unknown)


def _not_found() -> Response:
    return PlainTextResponse("Not Found", status_code=404)  # what Starlette answers for a path it lacks


def _answer(status: int, code: int, msg: str) -> Response:
    return JSONResponse({"code": code, "msg": msg}, status_code=status)


async def sms_report(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    expected = rt.config.report_token
    token = request.path_params["token"]
    if expected is None or not hmac.compare_digest(token.encode(errors="replace"), expected.encode()):
        return _not_found()
    if request.method != "POST":
        return Response(status_code=405, headers={"Allow": "POST"})
    body = await read_limited(request, MAX_REPORT_BYTES)
    if body is None:
        rt.metrics.receipt_pushes.labels("too_large").inc()
        return _answer(413, 1, f"a push is at most {MAX_REPORT_BYTES} bytes")
    try:
        receipts = parse_receipts(body)
    except InvalidReport as exc:
        rt.metrics.receipt_pushes.labels("invalid").inc()
        log.warning("receipt push refused", extra={"error": str(exc)})
        return _answer(400, 1, str(exc))
    try:
        stored = await rt.store.record_receipts(receipts, "push", timeout=10.0)
    except (DatabaseUnavailable, psycopg.Error) as exc:
        # Not acknowledged: Aliyun pushes it again (after 1, 5 and 10 minutes, or longer).
        rt.metrics.receipt_pushes.labels("not_stored").inc()
        log.error("receipts not stored; Aliyun will push them again", extra={"error": failure_name(exc),
                                                                              "receipts": len(receipts)})  # fmt: skip
        return _answer(503, 1, "receipts not stored, push again later")
    rt.metrics.receipt_pushes.labels("stored").inc()
    observe_receipts(rt.metrics, stored)
    log.info("receipts stored", extra={"receipts": len(receipts), "changed": len(stored.changed),
                                       "repeated": stored.repeated, "unknown": stored.unknown})  # fmt: skip
    return _answer(200, 0, "成功")


class _EveryMethod:
    """Starlette routes a plain function for GET alone and answers other methods 405, which would
    tell a wrong token that the path exists; an ASGI app is routed for every method."""

    def __init__(self) -> None:
        self._app = request_response(sms_report)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def report_route() -> Route:
    return Route("/aliyun/sms-report/{token}", _EveryMethod())
