"""The fake Aliyun SMS server, exercised with the real SDK (no mocks) over both transports."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from alibabacloud_dysmsapi20170525.client import Client
from alibabacloud_dysmsapi20170525.models import (
    QuerySendDetailsRequest,
    SendSmsRequest,
    SendSmsResponse,
)
from alibabacloud_tea_openapi.exceptions import ClientException, ServerException, ThrottlingException
from alibabacloud_tea_openapi.models import Config
from alibabacloud_tea_openapi.utils_models import OpenApiRequest, Params
from darabonba.exceptions import RetryError, UnretryableException
from darabonba.runtime import RuntimeOptions

from tests.support.fake_aliyun import (
    BusinessError,
    Delay,
    Drop,
    FakeAliyun,
    GatewayError,
    NonJsonError,
    Rejection,
    flow_control,
    refused_endpoint,
    send_raw,
    throttling,
)

AK = "LTAI-test-key"
SECRET = "test-secret/with+odd=chars"
PHONE = "8613012341234"
SIGN = "阿里云短信测试"
TEMPLATE = "SMS_154950909"
CST = timezone(timedelta(hours=8))


@pytest.fixture
def fake() -> Iterator[FakeAliyun]:
    with FakeAliyun(credentials={AK: SECRET}) as server:
        yield server
    assert server.errors == []


def make_client(endpoint: str, *, secret: str = SECRET, ak: str = AK, **extra: Any) -> Client:
    return Client(Config(access_key_id=ak, access_key_secret=secret, endpoint=endpoint, protocol="http", **extra))


def request(phone: str = PHONE, code: str = "123456", out_id: str | None = "job-1", **kw: str) -> SendSmsRequest:
    return SendSmsRequest(
        phone_numbers=phone,
        sign_name=kw.get("sign_name", SIGN),
        template_code=kw.get("template_code", TEMPLATE),
        template_param=kw.get("template_param", json.dumps({"code": code})),
        out_id=out_id,
    )


def runtime(read_timeout: int = 2000) -> RuntimeOptions:
    return RuntimeOptions(connect_timeout=1000, read_timeout=read_timeout)


def send(client: Client, req: SendSmsRequest, rt: RuntimeOptions | None = None) -> SendSmsResponse:
    return client.send_sms_with_options(req, rt or runtime())


def send_async(client: Client, req: SendSmsRequest, rt: RuntimeOptions | None = None) -> SendSmsResponse:
    async def go() -> SendSmsResponse:
        return await client.send_sms_with_options_async(req, rt or runtime())

    return asyncio.run(go())


TRANSPORTS = [pytest.param(send, id="sync"), pytest.param(send_async, id="async")]


# --- happy paths ----------------------------------------------------------------------------------------


def test_sync_send_is_accepted_and_recorded(fake: FakeAliyun) -> None:
    before = time.time()
    resp = send(make_client(fake.endpoint), request(out_id="job-42"))

    assert resp.status_code == 200
    assert resp.body.code == "OK" and resp.body.message == "OK"
    assert re.fullmatch(r"\d{15,}\^0", resp.body.biz_id)
    assert re.fullmatch(r"[0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}", resp.body.request_id)
    assert resp.headers["x-acs-request-id"] == resp.body.request_id

    [rec] = fake.wait_for_sends(1, timeout=1)
    assert rec.phone_numbers == PHONE and rec.phones == [PHONE]
    assert rec.sign_name == SIGN
    assert rec.template_code == TEMPLATE
    assert rec.template_param == {"code": "123456"}
    assert rec.out_id == "job-42"
    assert rec.biz_id == resp.body.biz_id
    assert rec.request_id == resp.body.request_id
    assert before - 1 <= rec.received_at <= time.time() + 1
    assert rec.access_key_id == AK and rec.signature_version == "v3"
    assert fake.rejected == [] and fake.requests_seen == 1


def test_async_send_is_accepted(fake: FakeAliyun) -> None:
    resp = send_async(make_client(fake.endpoint), request(code="654321"))

    assert resp.body.code == "OK"
    [rec] = fake.sends
    assert rec.template_param == {"code": "654321"} and rec.biz_id == resp.body.biz_id


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_awkward_values_pass_verification(fake: FakeAliyun, transport: Any) -> None:
    client = make_client(fake.endpoint)
    values = ["a b", "+86 & a=b", "*~/%", "100% a+b=c/d*e~f", "中文签名", "emoji 🚀✅", "%2B%20 literal"]
    for value in values:
        param = json.dumps({"code": "1234", "v": value}, ensure_ascii=False)
        resp = transport(client, request(sign_name=value, template_param=param, out_id=value))
        assert resp.body.code == "OK", (value, fake.rejected)

    assert fake.rejected == []
    recorded = fake.sends
    assert [s.sign_name for s in recorded] == values
    assert [s.out_id for s in recorded] == values
    assert [s.template_param["v"] for s in recorded] == values


def test_sync_client_reuses_one_keep_alive_connection(fake: FakeAliyun) -> None:
    client = make_client(fake.endpoint)
    for i in range(10):
        assert send(client, request(out_id=f"k{i}")).body.code == "OK"
    assert fake.connections_seen == 1


def test_concurrent_sends_are_all_recorded(fake: FakeAliyun) -> None:
    client = make_client(fake.endpoint)
    # DaraCore._get_session is unsynchronised: cold concurrent calls each build a Session (and an SSL
    # context, ~50 ms of CPU each) and open their own connection. Warm it first.
    assert send(client, request(out_id="warm-up")).body.code == "OK"
    codes: list[str] = []

    def worker(i: int) -> None:
        codes.append(send(client, request(out_id=f"c{i}")).body.code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert codes == ["OK"] * 20
    out_ids = sorted(s.out_id or "" for s in fake.wait_for_sends(21, timeout=2))
    assert out_ids == sorted([*(f"c{i}" for i in range(20)), "warm-up"])


# --- verification failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_secret_is_rejected(fake: FakeAliyun, transport: Any) -> None:
    with pytest.raises(ClientException) as info:
        transport(make_client(fake.endpoint, secret="wrong"), request())

    assert info.value.code == "SignatureDoesNotMatch"
    assert info.value.status_code == 400
    assert fake.sends == []
    assert [r.code for r in fake.rejected] == ["SignatureDoesNotMatch"]


def test_unknown_access_key_is_404(fake: FakeAliyun) -> None:
    with pytest.raises(ClientException) as info:
        send(make_client(fake.endpoint, ak="LTAI-nobody"), request())

    assert (info.value.status_code, info.value.code) == (404, "InvalidAccessKeyId.NotFound")
    assert fake.sends == []


def test_replayed_request_is_rejected(fake: FakeAliyun) -> None:
    send(make_client(fake.endpoint), request())
    [original] = fake.captured

    status, body = send_raw(fake.endpoint, original)

    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    assert len(fake.sends) == 1
    assert fake.rejected[-1].code == "SignatureNonceUsed"


def test_tampered_phone_number_is_rejected(fake: FakeAliyun) -> None:
    fake.fail_next(Drop())  # the genuine request must not get through, only its tampered copy
    with pytest.raises(UnretryableException):
        send(make_client(fake.endpoint), request())
    [original] = fake.captured

    status, body = send_raw(fake.endpoint, original.with_query_param("PhoneNumbers", "8613099999999"))

    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    assert fake.sends == []


def test_tampered_body_is_rejected(fake: FakeAliyun) -> None:
    send(make_client(fake.endpoint), request())
    [original] = fake.captured
    tampered = type(original)(original.method, original.target, original.headers, b"PhoneNumbers=1")

    status, body = send_raw(fake.endpoint, tampered)

    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    assert "x-acs-content-sha256" in fake.rejected[-1].reason


def test_clock_skew_beyond_15_minutes_is_rejected() -> None:
    with FakeAliyun(credentials={AK: SECRET}, clock=lambda: time.time() + 16 * 60) as fake:
        with pytest.raises(ClientException) as info:
            send(make_client(fake.endpoint), request())
    assert info.value.code == "InvalidTimeStamp.Expired"
    assert fake.sends == []


def test_v2_signature_is_accepted_and_wrong_secret_rejected(fake: FakeAliyun) -> None:
    resp = send(make_client(fake.endpoint, signature_algorithm="v2"), request(sign_name="签名 a+b/*~"))
    assert resp.body.code == "OK"
    assert fake.sends[0].signature_version == "v2" and fake.sends[0].sign_name == "签名 a+b/*~"

    resp = send_async(make_client(fake.endpoint, signature_algorithm="v2"), request())
    assert resp.body.code == "OK"

    with pytest.raises(ClientException) as info:
        send(make_client(fake.endpoint, secret="wrong", signature_algorithm="v2"), request())
    assert info.value.code == "SignatureDoesNotMatch"
    assert len(fake.sends) == 2


def test_v2_replay_is_rejected(fake: FakeAliyun) -> None:
    send(make_client(fake.endpoint, signature_algorithm="v2"), request())
    status, body = send_raw(fake.endpoint, fake.captured[0])
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")


# --- parameter validation -----------------------------------------------------------------------------


def test_missing_sign_name_is_a_gateway_error(fake: FakeAliyun) -> None:
    req = SendSmsRequest(phone_numbers=PHONE, template_code=TEMPLATE, template_param='{"code":"1234"}')
    with pytest.raises(ClientException) as info:
        send(make_client(fake.endpoint), req)
    assert (info.value.status_code, info.value.code) == (400, "MissingSignName")


@pytest.mark.parametrize("param", ['{"code": 1234}', '["1234"]', "not json"])
def test_template_param_must_be_object_of_strings(fake: FakeAliyun, param: str) -> None:
    resp = send(make_client(fake.endpoint), request(template_param=param))
    assert resp.status_code == 200
    assert resp.body.code == "isv.INVALID_JSON_PARAM" and resp.body.biz_id is None
    assert fake.sends == []


def test_illegal_phone_number(fake: FakeAliyun) -> None:
    resp = send(make_client(fake.endpoint), request(phone="not-a-phone"))
    assert resp.body.code == "isv.MOBILE_NUMBER_ILLEGAL"
    assert fake.sends == []


def test_unknown_action_is_404(fake: FakeAliyun) -> None:
    client = make_client(fake.endpoint)
    params = Params(
        action="NoSuchAction",
        version="2017-05-25",
        protocol="HTTP",
        pathname="/",
        method="POST",
        auth_type="AK",
        style="RPC",
        req_body_type="formData",
        body_type="json",
    )
    with pytest.raises(ClientException) as info:
        client.call_api(params, OpenApiRequest(query={}), runtime())
    assert (info.value.status_code, info.value.code) == (404, "InvalidAction.NotFound")


# --- faults as the SDK sees them (reference §6) ---------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_business_error_is_a_normal_response(fake: FakeAliyun, transport: Any) -> None:
    client = make_client(fake.endpoint)
    fake.fail_next(flow_control("minute"), times=2)

    for _ in range(2):
        resp = transport(client, request())
        assert resp.status_code == 200
        assert resp.body.code == "isv.BUSINESS_LIMIT_CONTROL"
        assert resp.body.message == "触发分钟级流控Permits:1"
        assert resp.body.biz_id is None and resp.body.request_id
    assert fake.sends == []

    assert transport(client, request()).body.code == "OK"
    assert len(fake.sends) == 1


def test_business_error_default_messages(fake: FakeAliyun) -> None:
    client = make_client(fake.endpoint)
    fake.fail_next(BusinessError("isv.AMOUNT_NOT_ENOUGH"))
    fake.fail_next(BusinessError("isv.MOBILE_NUMBER_ILLEGAL", "custom"))
    assert send(client, request()).body.message == "账户余额不足"
    assert send(client, request()).body.message == "custom"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("status,code", [(500, "InternalError"), (503, "ServiceUnavailable")])
def test_5xx_json_is_server_exception(fake: FakeAliyun, transport: Any, status: int, code: str) -> None:
    fake.fail_next(GatewayError(status, code))
    with pytest.raises(ServerException) as info:
        transport(make_client(fake.endpoint), request())
    assert (info.value.status_code, info.value.code) == (status, code)
    assert fake.sends == []


def test_retry_after_is_throttling_exception(fake: FakeAliyun) -> None:
    fake.fail_next(throttling(retry_after_ms=1500))
    with pytest.raises(ThrottlingException) as info:
        send(make_client(fake.endpoint), request())
    assert info.value.code == "Throttling.User" and info.value.retry_after == 1500


def test_throttling_without_retry_after_is_client_exception(fake: FakeAliyun) -> None:
    fake.fail_next(throttling())
    with pytest.raises(ClientException) as info:
        send(make_client(fake.endpoint), request())
    assert (info.value.status_code, info.value.code) == (400, "Throttling.User")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_non_json_error_page_is_unretryable(fake: FakeAliyun, transport: Any) -> None:
    client = make_client(fake.endpoint)
    fake.fail_next(NonJsonError())
    with pytest.raises(UnretryableException):
        transport(client, request())
    assert fake.sends == []
    assert transport(client, request()).body.code == "OK"  # the client recovers from the closed connection


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_read_timeout_still_records_the_send(fake: FakeAliyun, transport: Any) -> None:
    fake.fail_next(Delay(0.6))
    with pytest.raises(UnretryableException) as info:
        transport(make_client(fake.endpoint), request(out_id="ambiguous"), runtime(read_timeout=200))
    assert info.value.code is None and isinstance(info.value.inner_exception, RetryError)
    [rec] = fake.wait_for_sends(1, timeout=1)
    assert rec.out_id == "ambiguous"


def test_delay_within_timeout_answers_ok(fake: FakeAliyun) -> None:
    fake.fail_next(Delay(0.3))
    started = time.monotonic()
    assert send(make_client(fake.endpoint), request()).body.code == "OK"
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("accepted", [True, False])
def test_dropped_connection(fake: FakeAliyun, transport: Any, accepted: bool) -> None:
    client = make_client(fake.endpoint)
    fake.fail_next(Drop(accepted=accepted, hang=0.1))
    with pytest.raises(UnretryableException):
        transport(client, request())
    assert len(fake.sends) == (1 if accepted else 0)
    assert fake.requests_seen == 1
    assert transport(client, request()).body.code == "OK"


def test_hang_beyond_read_timeout_then_drop(fake: FakeAliyun) -> None:
    fake.fail_next(Drop(accepted=True, hang=0.6))
    with pytest.raises(UnretryableException):
        send(make_client(fake.endpoint), request(), runtime(read_timeout=200))
    assert len(fake.sends) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_refused_is_unretryable(transport: Any) -> None:
    with pytest.raises(UnretryableException) as info:
        transport(make_client(refused_endpoint()), request())
    assert info.value.code is None and isinstance(info.value.inner_exception, RetryError)


def test_per_phone_rule_and_default(fake: FakeAliyun) -> None:
    client = make_client(fake.endpoint)
    fake.fail_phone("+8613000000000", BusinessError("isv.MOBILE_NUMBER_ILLEGAL"))
    assert send(client, request(phone="8613000000000")).body.code == "isv.MOBILE_NUMBER_ILLEGAL"
    assert send(client, request(phone="8613000000000")).body.code == "isv.MOBILE_NUMBER_ILLEGAL"
    assert send(client, request(phone=PHONE)).body.code == "OK"

    fake.set_default(BusinessError("isv.AMOUNT_NOT_ENOUGH"))
    fake.fail_next(GatewayError(503, "ServiceUnavailable"))
    with pytest.raises(ServerException):
        send(client, request(phone="8613000000000"))  # the scripted queue wins over phone rules
    assert send(client, request(phone=PHONE)).body.code == "isv.AMOUNT_NOT_ENOUGH"
    fake.set_default(None)
    fake.fail_phone("8613000000000", None)
    assert send(client, request(phone="8613000000000")).body.code == "OK"
    assert len(fake.sends) == 2


def test_rejected_requests_do_not_consume_faults(fake: FakeAliyun) -> None:
    fake.fail_next(flow_control("hour"))
    with pytest.raises(ClientException):
        send(make_client(fake.endpoint, secret="wrong"), request())
    assert send(make_client(fake.endpoint), request()).body.message == "触发小时级流控Permits:5"


# --- QuerySendDetails and helpers ---------------------------------------------------------------------


def test_query_send_details_reconciles_by_out_id(fake: FakeAliyun) -> None:
    client = make_client(fake.endpoint)
    fake.fail_next(Delay(0.5))
    with pytest.raises(UnretryableException):
        send(client, request(out_id="job-7", code="777777"), runtime(read_timeout=150))
    other = send(client, request(phone="8613055555555", out_id="job-8"))
    assert other.body.code == "OK"

    today = datetime.now(CST).strftime("%Y%m%d")
    query = QuerySendDetailsRequest(phone_number=PHONE, send_date=today, page_size=10, current_page=1)
    resp = client.query_send_details_with_options(query, runtime())

    assert resp.body.code == "OK"
    assert int(resp.body.total_count) == 1
    [dto] = resp.body.sms_send_detail_dtos.sms_send_detail_dto
    assert dto.out_id == "job-7"
    assert dto.phone_num == PHONE
    assert dto.send_status == 3 and dto.err_code == "DELIVERED"
    assert dto.template_code == TEMPLATE
    assert "777777" in dto.content and SIGN in dto.content
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", dto.send_date)

    by_biz = QuerySendDetailsRequest(
        phone_number="8613055555555", send_date=today, page_size=10, current_page=1, biz_id=other.body.biz_id
    )
    [dto] = client.query_send_details_with_options(by_biz, runtime()).body.sms_send_detail_dtos.sms_send_detail_dto
    assert dto.out_id == "job-8"

    yesterday = (datetime.now(CST) - timedelta(days=1)).strftime("%Y%m%d")
    empty = QuerySendDetailsRequest(phone_number=PHONE, send_date=yesterday, page_size=10, current_page=1)
    resp = client.query_send_details_with_options(empty, runtime())
    assert int(resp.body.total_count) == 0 and resp.body.sms_send_detail_dtos.sms_send_detail_dto == []


def test_wait_for_sends_times_out(fake: FakeAliyun) -> None:
    with pytest.raises(AssertionError, match="expected at least 1 sends"):
        fake.wait_for_sends(1, timeout=0.05)


def test_wait_for_sends_wakes_on_arrival(fake: FakeAliyun) -> None:
    client = make_client(fake.endpoint)
    timer = threading.Timer(0.1, lambda: send(client, request()))
    timer.start()
    try:
        assert len(fake.wait_for_sends(1, timeout=2)) == 1
    finally:
        timer.join()


def test_reset_and_rejection_records(fake: FakeAliyun) -> None:
    with pytest.raises(ClientException):
        send(make_client(fake.endpoint, secret="wrong"), request())
    [rejection] = fake.rejected
    code, reason = rejection
    assert isinstance(rejection, Rejection) and code == "SignatureDoesNotMatch" and "V3" in reason
    fake.fail_next(Drop())
    fake.reset()

    assert (fake.sends, fake.rejected, fake.captured, fake.requests_seen) == ([], [], [], 0)
    assert send(make_client(fake.endpoint), request()).body.code == "OK"  # the queued Drop is gone


def test_explicit_start_stop_and_properties() -> None:
    fake = FakeAliyun(credentials={AK: SECRET})
    with pytest.raises(RuntimeError):
        _ = fake.endpoint
    fake.start()
    try:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", fake.endpoint)
        assert fake.url == f"http://{fake.endpoint}"
        assert fake.config_kwargs()["access_key_secret"] == SECRET
        client = Client(Config(**fake.config_kwargs()))
        assert send(client, request()).body.code == "OK"
    finally:
        fake.stop()
    fake.stop()  # idempotent
