"""Alibaba Cloud SMS through the official SDK (`alibabacloud-dysmsapi20170525`).

The synchronous client is used from worker threads: the async methods build a new TLS context and
connection for every call on the event loop. The SDK is imported on first use because importing it
costs about 0.4 s and 47 MB.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from sidecar.config import AliyunConfig
from sidecar.logs import silence_sdk_logger
from sidecar.providers.base import Outcome, SendResult, Sms, Timeouts
from sidecar.providers.errors import CONNECT_PHASE, Failure, ProviderError, describe_failure, provider_text

__all__ = ["AliyunProvider", "classify_business_error"]

log = logging.getLogger(__name__)

_CHINA = timezone(timedelta(hours=8))  # Aliyun keeps send records by China Standard Time day

_NUMBER = {"isv.MOBILE_NUMBER_ILLEGAL", "isv.MOBILE_COUNT_OVER_LIMIT", "isv.DOMESTIC_NUMBER_NOT_SUPPORTED"}
_ACCOUNT_CAP = {"isv.DAY_LIMIT_CONTROL", "isv.MONTH_LIMIT_CONTROL"}
_TRANSIENT = {"isp.SYSTEM_ERROR", "isp.GATEWAY_ERROR", "isp.UNKNOWN"}


def classify_business_error(code: str, message: str) -> SendResult:
    """An HTTP 200 answer whose Code is not OK: Aliyun did not send."""
    message = provider_text(message)
    if code == "isv.BUSINESS_LIMIT_CONTROL":
        # Per-number flow control; the message names the window (分钟级 / 小时级 / 天级).
        wait = 86400 if "天级" in message else 3600 if "小时级" in message else 60
        return SendResult(Outcome.RETRY, code, message, status=429, retry_after=wait)
    if code in _NUMBER:
        return SendResult(Outcome.REJECTED, code, message, status=400)
    if code in _ACCOUNT_CAP:
        return SendResult(Outcome.REJECTED, code, message, status=503, alert=True)
    if code in _TRANSIENT:
        return SendResult(Outcome.RETRY, code, message, status=502)
    # Balance, sign, template, parameters, content, permissions, or a code we do not know:
    # only an operator can fix these, and resending cannot help.
    return SendResult(Outcome.REJECTED, code, message, status=500, alert=True)


def _classify_exception(exc: Exception, endpoint: str) -> SendResult:
    """An SDK exception as a result whose message is safe to store and show (see providers/errors.py)."""
    from alibabacloud_tea_openapi.exceptions import ServerException, ThrottlingException
    from darabonba.exceptions import ResponseException, UnretryableException

    if not isinstance(exc, ResponseException):  # no answer from the API
        kind, message = describe_failure(exc, endpoint)
        if kind in CONNECT_PHASE:
            return SendResult(Outcome.RETRY, "ConnectFailed", message, status=503, connect_failure=True)
        if kind is Failure.BAD_ANSWER or (kind is Failure.OTHER and isinstance(exc, UnretryableException)):
            # An error page that is not JSON (a proxy in between failed): the API did not take it.
            return SendResult(Outcome.RETRY, "BadGateway", message, status=502)
        if kind is not Failure.OTHER:
            # Read timeout, reset, a dropped reply, TLS trouble: Aliyun may have sent it.
            return SendResult(Outcome.AMBIGUOUS, "NoResponse", message, status=504)
        # Raised before any request (credentials) or a bug: an operator has to look.
        return SendResult(Outcome.REJECTED, type(exc).__name__, message, status=500, alert=True)

    # A JSON error answer. Its Message is Aliyun's own text, which is kept, cut short of any request echo.
    code = str(getattr(exc, "code", "") or type(exc).__name__)
    data = getattr(exc, "data", None) or {}
    message = provider_text(str(data.get("Message") or getattr(exc, "message", "") or code))
    request_id = _none_if_missing(getattr(exc, "request_id", None))
    if isinstance(exc, ThrottlingException) or code.startswith("Throttling"):
        retry_after_ms = getattr(exc, "retry_after", None)
        wait = max(1, int(retry_after_ms) // 1000) if retry_after_ms else 1
        return SendResult(Outcome.RETRY, code, message, request_id=request_id, status=503, retry_after=wait)
    if code == "SignatureNonceUsed":
        return SendResult(Outcome.RETRY, code, message, request_id=request_id, status=503)
    if isinstance(exc, ServerException):
        return SendResult(Outcome.RETRY, code, message, request_id=request_id, status=502)
    # Signature, access key, RAM permission, clock or request errors.
    return SendResult(Outcome.REJECTED, code, message, request_id=request_id, status=500, alert=True)


def _none_if_missing(value: Any) -> str | None:
    # The SDK fills absent fields with the string "None".
    return None if value in (None, "", "None") else str(value)


class AliyunProvider:
    name = "aliyun"

    def __init__(self, config: AliyunConfig) -> None:
        self.config = config
        self._client: Any = None
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from alibabacloud_dysmsapi20170525.client import Client
                from alibabacloud_tea_openapi.models import Config

                silence_sdk_logger()
                self._client = Client(
                    Config(
                        access_key_id=self.config.access_key_id,
                        access_key_secret=self.config.access_key_secret,
                        endpoint=self.config.endpoint,
                        protocol=self.config.protocol,
                    )
                )
            return self._client

    def warm_up(self) -> None:
        """Import the SDK and build the client before the first request needs them."""
        self._get_client()

    def route(self, sms: Sms) -> tuple[str, str] | None:
        """Sign name and template: per-purpose row or defaults for mainland numbers, else international."""
        if sms.phone.startswith("86"):
            return (sms.sign_name or self.config.sign_name, sms.template_code or self.config.template_code)
        if self.config.intl_sign_name and self.config.intl_template_code:
            return (self.config.intl_sign_name, self.config.intl_template_code)
        return None

    def send(self, sms: Sms, timeouts: Timeouts) -> SendResult:
        route = self.route(sms)
        if route is None:
            return SendResult(
                Outcome.REJECTED, "NoInternationalTemplate",
                "set ALIYUN_SMS_INTL_SIGN_NAME and ALIYUN_SMS_INTL_TEMPLATE_CODE for numbers outside mainland China",
                status=500, alert=True,
            )  # fmt: skip
        if not 4 <= len(sms.code) <= 6:
            return SendResult(
                Outcome.REJECTED, "CodeLengthUnsupported",
                f"Aliyun verification templates take 4-6 characters, got {len(sms.code)}: "
                "set GOTRUE_SMS_OTP_LENGTH=6 (and GOTRUE_MFA_PHONE_OTP_LENGTH=6)",
                status=500, alert=True,
            )  # fmt: skip
        from alibabacloud_dysmsapi20170525.models import SendSmsRequest
        from darabonba.runtime import RuntimeOptions

        # Mainland numbers go without the country code: unambiguous for Aliyun's domestic route.
        phone = sms.phone[2:] if sms.phone.startswith("86") else sms.phone
        request = SendSmsRequest(
            phone_numbers=phone,
            sign_name=route[0],
            template_code=route[1],
            template_param=json.dumps({self.config.template_param: sms.code}),
            out_id=sms.out_id,
        )
        runtime = RuntimeOptions(connect_timeout=timeouts.connect_ms, read_timeout=timeouts.read_ms, autoretry=False)
        try:
            response = self._get_client().send_sms_with_options(request, runtime)
        except Exception as exc:  # every SDK error derives from TeaException; anything else is still a failure
            return _classify_exception(exc, self.config.endpoint)
        body = response.body
        code = str(getattr(body, "code", "") or "")
        message = provider_text(str(getattr(body, "message", "") or ""))
        request_id = _none_if_missing(getattr(body, "request_id", None))
        if code == "OK":
            return SendResult(Outcome.ACCEPTED, code, message, biz_id=body.biz_id, request_id=request_id)
        result = classify_business_error(code or "EmptyResponse", message)
        return SendResult(**{**result.__dict__, "request_id": request_id})

    def find_sent(self, phone: str, out_ids: list[str], since: datetime) -> SendResult | None:
        """QuerySendDetails for each China-time day since `since`, matched on our OutId.

        Raises ProviderError, never the SDK's errors: their texts carry the query (the phone number).
        """
        from alibabacloud_dysmsapi20170525.models import QuerySendDetailsRequest
        from darabonba.runtime import RuntimeOptions

        number = phone[2:] if phone.startswith("86") else phone
        wanted = set(out_ids)
        day = since.astimezone(_CHINA).date()
        runtime = RuntimeOptions(connect_timeout=2000, read_timeout=5000, autoretry=False)
        while day <= datetime.now(_CHINA).date():
            request = QuerySendDetailsRequest(phone_number=number, send_date=day.strftime("%Y%m%d"), page_size=50,
                                              current_page=1)  # fmt: skip
            try:
                body = self._get_client().query_send_details_with_options(request, runtime).body
            except Exception as exc:
                failed = _classify_exception(exc, self.config.endpoint)
                raise ProviderError(failed.code, f"QuerySendDetails: {failed.message}") from None
            if body.code != "OK":
                raise ProviderError(str(body.code), f"QuerySendDetails answered {body.code}: "
                                    f"{provider_text(str(body.message or ''))}")  # fmt: skip
            details = body.sms_send_detail_dtos.sms_send_detail_dto if body.sms_send_detail_dtos else []
            for item in details or []:
                if item.out_id in wanted and item.send_status != 2:  # 2: the carrier reported failure
                    return SendResult(Outcome.ACCEPTED, "RECONCILED", f"found by QuerySendDetails ({item.err_code})",
                                      request_id=_none_if_missing(body.request_id))  # fmt: skip
            day += timedelta(days=1)
        return None
