"""How the Aliyun provider reads every fault tests/fake_aliyun.py can inject: the ledger's outcome, the
kind of failure, and the status the hook answers GoTrue with (sidecar/outcomes.py, sidecar/hook.py)."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import pytest

from sidecar.config import AliyunConfig
from sidecar.hook import HTTP_STATUS
from sidecar.outcomes import Kind, Outcome, SendResult
from sidecar.providers.aliyun import AliyunProvider
from sidecar.providers.base import Sms
from tests.support.aliyun import aliyun_config
from tests.support.fake_aliyun import (
    _MESSAGES,
    BusinessError,
    Delay,
    Drop,
    FakeAliyun,
    GatewayError,
    NonJsonError,
    flow_control,
    refused_endpoint,
    throttling,
)

TIMEOUT = 1.0  # the provider's whole-call deadline in these sends


class Case(NamedTuple):
    fault: Any  # a fault of the fake, None for a plain OK, or "refused" for an endpoint nobody listens on
    outcome: Outcome
    kind: Kind | None
    status: int
    code: str
    retry_after: int | None = None
    alert: bool = False


operator = {"outcome": Outcome.REJECTED, "kind": Kind.NEEDS_OPERATOR, "status": 500, "alert": True}
CASES = {
    "ok": Case(None, Outcome.ACCEPTED, None, 200, "OK"),
    "flow-control-minute": Case(flow_control("minute"), Outcome.RETRY, Kind.RATE_LIMITED, 429,
                                "isv.BUSINESS_LIMIT_CONTROL", retry_after=60),
    "flow-control-hour": Case(flow_control("hour"), Outcome.RETRY, Kind.RATE_LIMITED, 429,
                              "isv.BUSINESS_LIMIT_CONTROL", retry_after=3600),
    "flow-control-day": Case(flow_control("day"), Outcome.RETRY, Kind.RATE_LIMITED, 429,
                             "isv.BUSINESS_LIMIT_CONTROL", retry_after=86400),
    "number-illegal": Case(BusinessError("isv.MOBILE_NUMBER_ILLEGAL"), Outcome.REJECTED, Kind.BAD_NUMBER, 400,
                           "isv.MOBILE_NUMBER_ILLEGAL"),
    "number-count": Case(BusinessError("isv.MOBILE_COUNT_OVER_LIMIT"), Outcome.REJECTED, Kind.BAD_NUMBER, 400,
                         "isv.MOBILE_COUNT_OVER_LIMIT"),
    "account-day-cap": Case(BusinessError("isv.DAY_LIMIT_CONTROL"), Outcome.REJECTED, Kind.UNAVAILABLE, 503,
                            "isv.DAY_LIMIT_CONTROL", alert=True),
    **{
        code: Case(BusinessError(code), code=code, **operator)  # type: ignore[arg-type]
        for code in ("isv.AMOUNT_NOT_ENOUGH", "isv.OUT_OF_SERVICE", "isv.INVALID_JSON_PARAM",
                     "isv.SMS_SIGNATURE_ILLEGAL", "isv.SMS_TEMPLATE_ILLEGAL")
    },
    "isp-system-error": Case(BusinessError("isp.SYSTEM_ERROR"), Outcome.RETRY, Kind.PROVIDER_ERROR, 502,
                             "isp.SYSTEM_ERROR"),
    "gateway-500": Case(GatewayError(500, "InternalError"), Outcome.RETRY, Kind.PROVIDER_ERROR, 502, "InternalError"),
    "gateway-503": Case(GatewayError(503, "ServiceUnavailable"), Outcome.RETRY, Kind.PROVIDER_ERROR, 502,
                        "ServiceUnavailable"),
    "throttling": Case(throttling(), Outcome.RETRY, Kind.UNAVAILABLE, 503, "Throttling.User", retry_after=1),
    "throttling-retry-after": Case(throttling(retry_after_ms=3000), Outcome.RETRY, Kind.UNAVAILABLE, 503,
                                   "Throttling.User", retry_after=3),
    "nonce-used": Case(GatewayError(400, "SignatureNonceUsed"), Outcome.RETRY, Kind.UNAVAILABLE, 503,
                       "SignatureNonceUsed"),
    **{
        code: Case(GatewayError(status, code), code=code, **operator)  # type: ignore[arg-type]
        for status, code in ((400, "SignatureDoesNotMatch"), (400, "IncompleteSignature"),
                             (404, "InvalidAccessKeyId.NotFound"), (400, "InvalidTimeStamp.Expired"),
                             (403, "Forbidden.RAM"))
    },
    "non-json": Case(NonJsonError(), Outcome.RETRY, Kind.PROVIDER_ERROR, 502, "BadGateway"),
    "delay": Case(Delay(TIMEOUT * 3), Outcome.AMBIGUOUS, Kind.TIMEOUT, 504, "NoResponse"),
    "drop": Case(Drop(), Outcome.AMBIGUOUS, Kind.TIMEOUT, 504, "NoResponse"),
    "drop-accepted": Case(Drop(accepted=True), Outcome.AMBIGUOUS, Kind.TIMEOUT, 504, "NoResponse"),
    "refused": Case("refused", Outcome.RETRY, Kind.UNAVAILABLE, 503, "ConnectFailed"),
}  # fmt: skip


def config(endpoint: str) -> AliyunConfig:
    return aliyun_config(endpoint, sign_name="Sign", template_code="SMS_1")


def send(endpoint: str) -> SendResult:
    async def go() -> SendResult:
        provider = AliyunProvider(config(endpoint))
        await provider.start()
        try:
            return await provider.send(Sms(phone="8613800138000", code="123456", out_id="1"), TIMEOUT)
        finally:
            await provider.close()

    return asyncio.run(go())


def test_every_business_code_the_fake_knows_is_a_case() -> None:
    business = {c.fault.code for c in CASES.values() if isinstance(c.fault, BusinessError)}
    assert business == {code for code in _MESSAGES if code.startswith(("isv.", "isp."))}


@pytest.mark.parametrize("name", list(CASES))
def test_classification(fake: FakeAliyun, name: str) -> None:
    case = CASES[name]
    fake.clear_faults()
    if case.fault not in (None, "refused"):
        fake.fail_next(case.fault)
    result = send(refused_endpoint() if case.fault == "refused" else fake.endpoint)
    status = 200 if result.kind is None else HTTP_STATUS[result.kind]
    assert (result.outcome, result.kind, status, result.code) == (case.outcome, case.kind, case.status, case.code)
    assert (result.retry_after, result.alert) == (case.retry_after, case.alert)
    assert result.connect_failure == (case.fault == "refused")
    # A stored failure reads back as the same kind (what a duplicate hook event and gRPC answer by).
    if not result.accepted and result.code.startswith(("isv.", "isp.")):
        assert AliyunProvider(config(fake.endpoint)).classify(result.code, result.message).kind is case.kind
