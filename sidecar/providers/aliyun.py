"""Alibaba Cloud SMS: the SDK's request models and signer, over one keep-alive aiohttp session.

The SDK's own transports are slow: its sync client blocks a thread per send, and its async method
builds a new TLS context, connector and session for every call (~33 ms CPU). So the request is
built from the SDK's models (`SendSmsRequest.validate()`/`to_map()`), signed by the SDK's
`Utils.get_authorization` (ACS3-HMAC-SHA256, the SDK's default, with its headers and nonce), and
sent over one `aiohttp.ClientSession` per process whose pool holds as many connections as sends
may be in flight. Every call has one deadline for the whole exchange, not per-read timeouts, so a
trickling or hanging endpoint cannot hold a caller past its budget. The SDK is imported in
`start()` because importing it costs about 0.4 s.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sidecar.config import AliyunConfig
from sidecar.logs import silence_sdk_logger
from sidecar.outcomes import (
    BAD_GATEWAY,
    CLIENT_ERROR,
    CODE_LENGTH_UNSUPPORTED,
    CONNECT_FAILED,
    EMPTY_RESPONSE,
    NO_INTERNATIONAL_TEMPLATE,
    NO_RESPONSE,
    OK,
    RECONCILED,
    Kind,
    Outcome,
    SendResult,
    stored_result,
)  # fmt: skip
from sidecar.providers.base import Receipt, Sms
from sidecar.providers.errors import CONNECT_PHASE, Failure, ProviderError, describe_failure, provider_text

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = ["CHINA", "AliyunProvider", "classify_business_error"]

CHINA = timezone(timedelta(hours=8))  # Aliyun keeps send records, and writes times, in China Standard Time
_API_VERSION = "2017-05-25"
_SIGNATURE = "ACS3-HMAC-SHA256"
CONNECT_TIMEOUT = 2.0  # at most this much of a call's deadline may go to connecting

_NUMBER = {"isv.MOBILE_NUMBER_ILLEGAL", "isv.MOBILE_COUNT_OVER_LIMIT", "isv.DOMESTIC_NUMBER_NOT_SUPPORTED"}
_ACCOUNT_CAP = {"isv.DAY_LIMIT_CONTROL", "isv.MONTH_LIMIT_CONTROL"}
_TRANSIENT = {"isp.SYSTEM_ERROR", "isp.GATEWAY_ERROR", "isp.UNKNOWN"}


def classify_business_error(code: str, message: str) -> SendResult:
    """An HTTP 200 answer whose Code is not OK: Aliyun did not send."""
    message = provider_text(message)
    if code == "isv.BUSINESS_LIMIT_CONTROL":
        # Per-number flow control; the message names the window (分钟级 / 小时级 / 天级).
        wait = 86400 if "天级" in message else 3600 if "小时级" in message else 60
        return SendResult(Outcome.RETRY, code, message, kind=Kind.RATE_LIMITED, retry_after=wait)
    if code in _NUMBER:
        return SendResult(Outcome.REJECTED, code, message, kind=Kind.BAD_NUMBER)
    if code in _ACCOUNT_CAP:
        return SendResult(Outcome.REJECTED, code, message, kind=Kind.UNAVAILABLE, alert=True)
    if code in _TRANSIENT:
        return SendResult(Outcome.RETRY, code, message, kind=Kind.PROVIDER_ERROR)
    # Balance, sign, template, parameters, content, permissions, or a code we do not know:
    # only an operator can fix these, and resending cannot help.
    return SendResult(Outcome.REJECTED, code, message, kind=Kind.NEEDS_OPERATOR, alert=True)


@dataclass
class _Answer:
    status: int
    body: dict[str, Any]
    retry_after_ms: int | None


class _Attempt:
    """Per call, set by aiohttp's trace hooks: whether the request has left for the provider."""

    sent = False


async def _on_headers_sent(session: Any, trace_config_ctx: SimpleNamespace, params: Any) -> None:
    attempt = trace_config_ctx.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.sent = True


def _transport_failure(exc: BaseException, endpoint: str, sent: bool) -> SendResult:
    """No usable answer: a result whose message is safe to store and show (see providers/errors.py)."""
    kind, message = describe_failure(exc, endpoint)
    if kind in CONNECT_PHASE or (not sent and kind in (Failure.TIMEOUT, Failure.TLS)):
        return SendResult(Outcome.RETRY, CONNECT_FAILED, message, kind=Kind.UNAVAILABLE, connect_failure=True)
    if kind is Failure.BAD_ANSWER:
        # An error page that is not JSON (a proxy in between failed): the API did not take it.
        return SendResult(Outcome.RETRY, BAD_GATEWAY, message, kind=Kind.PROVIDER_ERROR)
    if kind is Failure.OTHER:
        # A bug on our side (the request could not be built or signed): an operator has to look.
        return SendResult(Outcome.REJECTED, CLIENT_ERROR, message, kind=Kind.NEEDS_OPERATOR, alert=True)
    # Read timeout, reset, a dropped reply: Aliyun may have sent it.
    return SendResult(Outcome.AMBIGUOUS, NO_RESPONSE, message, kind=Kind.TIMEOUT)


def _classify_error_answer(answer: _Answer) -> SendResult:
    """An HTTP 4xx/5xx JSON answer from the API gateway. Its Message is Aliyun's own text, kept but cut
    short of any request echo."""
    body = answer.body
    code = str(body.get("Code") or body.get("code") or f"HTTP{answer.status}")
    message = provider_text(str(body.get("Message") or body.get("message") or code))
    request_id = _none_if_missing(body.get("RequestId") or body.get("requestId"))
    if answer.retry_after_ms is not None or code.startswith("Throttling"):
        wait = max(1, answer.retry_after_ms // 1000) if answer.retry_after_ms else 1
        return SendResult(Outcome.RETRY, code, message, request_id=request_id, kind=Kind.UNAVAILABLE, retry_after=wait)
    if code == "SignatureNonceUsed":
        return SendResult(Outcome.RETRY, code, message, request_id=request_id, kind=Kind.UNAVAILABLE)
    if answer.status >= 500:
        return SendResult(Outcome.RETRY, code, message, request_id=request_id, kind=Kind.PROVIDER_ERROR)
    # Signature, access key, RAM permission, clock or request errors.
    return SendResult(Outcome.REJECTED, code, message, request_id=request_id, kind=Kind.NEEDS_OPERATOR, alert=True)


def _none_if_missing(value: Any) -> str | None:
    return None if value in (None, "", "None") else str(value)


class AliyunProvider:
    name = "aliyun"

    def __init__(self, config: AliyunConfig, max_connections: int = 512) -> None:
        self.config = config
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._sdk: SimpleNamespace | None = None

    def _load_sdk(self) -> SimpleNamespace:
        if self._sdk is None:
            from alibabacloud_dysmsapi20170525 import models
            from alibabacloud_tea_openapi.utils import Utils, get_canonical_query_string
            from darabonba.request import DaraRequest

            silence_sdk_logger()
            self._sdk = SimpleNamespace(models=models, Utils=Utils, canonical_query=get_canonical_query_string,
                                        Request=DaraRequest, user_agent=Utils.get_user_agent(None))  # fmt: skip
        return self._sdk

    async def start(self) -> None:
        """The SDK's modules, and the process's one session (in the loop that will use it)."""
        if self._session is not None:
            return
        import aiohttp  # here, not at import: `check` and the console-mode tests import this module too

        self._load_sdk()
        tls: ssl.SSLContext | bool = ssl.create_default_context() if self.config.protocol == "https" else False
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_on_headers_sent)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ssl=tls, ttl_dns_cache=300,
                                           keepalive_timeout=60, enable_cleanup_closed=True),
            trace_configs=[trace],
            # The API sets no cookies worth keeping; the default jar costs ~10% of a send's CPU.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Content-Type"),  # the SDK's headers, and nothing it did not sign
            raise_for_status=False,
        )  # fmt: skip

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def route(self, sms: Sms) -> tuple[str, str] | None:
        """Sign name and template: per-purpose row or defaults for mainland numbers, else international."""
        if sms.phone.startswith("86"):
            return (sms.sign_name or self.config.sign_name, sms.template_code or self.config.template_code)
        if self.config.intl_sign_name and self.config.intl_template_code:
            return (self.config.intl_sign_name, self.config.intl_template_code)
        return None

    def _signed(self, action: str, request: Any) -> tuple[URL, dict[str, str]]:
        """The URL and headers of an RPC call, as the SDK's `do_request` builds and signs them."""
        sdk = self._load_sdk()
        request.validate()
        prepared = sdk.Request()
        prepared.protocol, prepared.method, prepared.pathname = self.config.protocol, "POST", "/"
        prepared.query = sdk.Utils.query(request.to_map())
        prepared.headers = {
            "host": self.config.endpoint,
            "x-acs-version": _API_VERSION,
            "x-acs-action": action,
            "user-agent": sdk.user_agent,
            "x-acs-date": sdk.Utils.get_timestamp(),
            "x-acs-signature-nonce": sdk.Utils.get_nonce(),
            "accept": "application/json",
        }
        payload = sdk.Utils.hash(b"", _SIGNATURE).hex()
        prepared.headers["x-acs-content-sha256"] = payload
        prepared.headers["Authorization"] = sdk.Utils.get_authorization(
            prepared, _SIGNATURE, payload, self.config.access_key_id, self.config.access_key_secret
        )
        from yarl import URL

        query = sdk.canonical_query(prepared.query)
        url = URL(f"{self.config.protocol}://{self.config.endpoint}/?{query}", encoded=True)
        return url, prepared.headers

    async def _call(self, action: str, request: Any, timeout: float) -> _Answer | SendResult:
        """One signed call within `timeout` seconds: the answer, or a SendResult saying why there is none."""
        import aiohttp

        if self._session is None:
            await self.start()
        assert self._session is not None
        attempt = _Attempt()
        try:
            url, headers = self._signed(action, request)
            # The whole call's deadline is asyncio.timeout's; aiohttp only bounds the connect.
            client_timeout = aiohttp.ClientTimeout(total=None, connect=min(CONNECT_TIMEOUT, timeout))
            async with asyncio.timeout(timeout):
                async with self._session.post(url, headers=headers, timeout=client_timeout,
                                              trace_request_ctx=attempt) as response:  # fmt: skip
                    raw = await response.read()
                    status, retry_header = response.status, response.headers.get("x-acs-retry-after")
        except Exception as exc:  # every transport failure, and the deadline
            return _transport_failure(exc, self.config.endpoint, attempt.sent)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            return _transport_failure(exc, self.config.endpoint, True)
        if not isinstance(body, dict):
            return SendResult(Outcome.RETRY, BAD_GATEWAY, f"{self.config.endpoint}: answer is not an object",
                              kind=Kind.PROVIDER_ERROR)  # fmt: skip
        retry_after = int(retry_header) if retry_header and retry_header.isdigit() and int(retry_header) > 0 else None
        return _Answer(status, body, retry_after)

    async def send(self, sms: Sms, timeout: float) -> SendResult:
        route = self.route(sms)
        if route is None:
            return SendResult(
                Outcome.REJECTED, NO_INTERNATIONAL_TEMPLATE,
                "set ALIYUN_SMS_INTL_SIGN_NAME and ALIYUN_SMS_INTL_TEMPLATE_CODE for numbers outside mainland China",
                kind=Kind.NEEDS_OPERATOR, alert=True,
            )  # fmt: skip
        if not 4 <= len(sms.code) <= 6:
            return SendResult(
                Outcome.REJECTED, CODE_LENGTH_UNSUPPORTED,
                f"Aliyun verification templates take 4-6 characters, got {len(sms.code)}: "
                "set GOTRUE_SMS_OTP_LENGTH=6 (and GOTRUE_MFA_PHONE_OTP_LENGTH=6)",
                kind=Kind.NEEDS_OPERATOR, alert=True,
            )  # fmt: skip
        # Mainland numbers go without the country code: unambiguous for Aliyun's domestic route.
        phone = sms.phone[2:] if sms.phone.startswith("86") else sms.phone
        request = self._load_sdk().models.SendSmsRequest(
            phone_numbers=phone,
            sign_name=route[0],
            template_code=route[1],
            template_param=json.dumps({self.config.template_param: sms.code}),
            out_id=sms.out_id,
        )
        answer = await self._call("SendSms", request, timeout)
        if isinstance(answer, SendResult):
            return answer
        if answer.status >= 400:
            return _classify_error_answer(answer)
        body = answer.body
        code, request_id = str(body.get("Code") or ""), _none_if_missing(body.get("RequestId"))
        message = provider_text(str(body.get("Message") or ""))
        if code == OK:
            return SendResult(Outcome.ACCEPTED, code, message, biz_id=_none_if_missing(body.get("BizId")),
                              request_id=request_id)  # fmt: skip
        result = classify_business_error(code or EMPTY_RESPONSE, message)
        return SendResult(**{**result.__dict__, "request_id": request_id})

    def classify(self, code: str, message: str) -> SendResult:
        """Aliyun's business codes as `classify_business_error` reads them; the rest are ours."""
        if code.startswith(("isv.", "isp.")):
            return classify_business_error(code, message)
        return stored_result(code, message)

    async def _send_details(self, phone: str, day: date, deadline: float, biz_id: str | None = None) -> dict[str, Any]:
        """One page of QuerySendDetails for a China-time day: its body (Code OK), newest sends first.

        Raises ProviderError, never a transport's error: their texts carry the query (the phone number).
        """
        loop = asyncio.get_running_loop()
        request = self._load_sdk().models.QuerySendDetailsRequest(
            phone_number=phone[2:] if phone.startswith("86") else phone, send_date=day.strftime("%Y%m%d"),
            page_size=50, current_page=1, biz_id=biz_id,
        )  # fmt: skip
        answer = await self._call("QuerySendDetails", request, max(0.05, deadline - loop.time()))
        if isinstance(answer, SendResult):
            raise ProviderError(answer.code, f"QuerySendDetails: {answer.message}")
        body = answer.body
        if answer.status >= 400 or body.get("Code") != OK:
            failed = _classify_error_answer(answer) if answer.status >= 400 else None
            code = failed.code if failed else str(body.get("Code"))
            raise ProviderError(code, f"QuerySendDetails answered {code}: "
                                f"{provider_text(str(body.get('Message') or ''))}")  # fmt: skip
        return body

    @staticmethod
    def _details(body: dict[str, Any]) -> list[dict[str, Any]]:
        found = (body.get("SmsSendDetailDTOs") or {}).get("SmsSendDetailDTO") or []
        return [item for item in found if isinstance(item, dict)]

    async def find_sent(self, phone: str, out_ids: list[str], since: datetime, timeout: float) -> SendResult | None:
        """QuerySendDetails for each China-time day since `since`, matched on our OutId."""
        wanted = set(out_ids)
        day = since.astimezone(CHINA).date()
        deadline = asyncio.get_running_loop().time() + timeout
        while day <= datetime.now(CHINA).date():
            body = await self._send_details(phone, day, deadline)
            for item in self._details(body):
                if item.get("OutId") in wanted and item.get("SendStatus") != 2:  # 2: the carrier reported failure
                    return SendResult(Outcome.ACCEPTED, RECONCILED,
                                      f"found by QuerySendDetails ({item.get('ErrCode')})",
                                      request_id=_none_if_missing(body.get("RequestId")))  # fmt: skip
            day += timedelta(days=1)
        return None

    async def query_receipt(self, phone: str, biz_id: str, sent_at: datetime, timeout: float) -> Receipt | None:
        """QuerySendDetails narrowed to one BizId: SendStatus 3 delivered, 2 failed, 1 still waiting."""
        deadline = asyncio.get_running_loop().time() + timeout
        body = await self._send_details(phone, sent_at.astimezone(CHINA).date(), deadline, biz_id=biz_id)
        for item in self._details(body):
            status = item.get("SendStatus")
            if status not in (2, 3):
                continue
            sent = _china_time(item.get("SendDate"))
            return Receipt(
                out_id=_none_if_missing(item.get("OutId")),
                biz_id=biz_id,
                phone=str(item.get("PhoneNum") or ""),
                success=status == 3,
                code=str(item.get("ErrCode") or ""),
                message="",
                report_time=_china_time(item.get("ReceiveDate")) or sent or datetime.now(UTC),
                send_time=sent,
            )
        return None


def _china_time(value: Any) -> datetime | None:
    """QuerySendDetails' "yyyy-MM-dd HH:mm:ss", China Standard Time."""
    try:
        return datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S").replace(tzinfo=CHINA)
    except ValueError:
        return None
