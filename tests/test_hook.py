"""The Send SMS hook end to end: GoTrue's exact requests, the real sidecar under uvicorn, the real
database, and the real Aliyun SDK talking to a fake Aliyun that checks its signatures."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from sidecar.app import create_app
from sidecar.config import AliyunConfig, Config
from sidecar.providers.aliyun import AliyunProvider
from sidecar.webhook import parse_secrets
from tests.support.aliyun import (
    AK_SECRET,
    INTL_SIGN,
    INTL_TEMPLATE,
    SIGN,
    TEMPLATE,
    aliyun_config as support_aliyun_config,
)
from tests.support.builders import fresh_phone
from tests.support.database import Database, auth_limits_hit, drain_queue
from tests.support.fake_aliyun import (
    BusinessError,
    Delay,
    Drop,
    FakeAliyun,
    GatewayError,
    flow_control,
    refused_endpoint,
)
from tests.support.gotrue import (
    GoTrueHookCaller,
    generate_secret,
    go_json,
    make_metadata,
    mfa_challenge,
    otp_login,
    phone_change,
    sign,
    signed_headers,
)
from tests.support.servers import run_app, sidecar_url

SECRET = generate_secret()
OTHER_SECRET = generate_secret()
NEW = (2, 196, 0)  # sends metadata and honours error objects
OLD = (2, 185, 0)  # no metadata: error objects would read as success


def aliyun_config(endpoint: str) -> AliyunConfig:
    return support_aliyun_config(endpoint, intl_sign_name=INTL_SIGN, intl_template_code=INTL_TEMPLATE)


def start(database: Database, endpoint: str, secrets: str = SECRET) -> Any:
    aliyun = aliyun_config(endpoint)
    config = Config(database_url=sidecar_url(database), hook_secrets=parse_secrets(secrets), provider="aliyun",
                    aliyun=aliyun)  # fmt: skip
    return run_app(create_app(config, AliyunProvider(aliyun)))


@pytest.fixture(scope="module")
def sidecar(database: Database, fake: FakeAliyun) -> Iterator[str]:
    drain_queue(database)  # its worker would otherwise deliver other modules' leftovers to the fake
    with start(database, fake.endpoint, f"{SECRET}|{OTHER_SECRET}") as url:
        yield url


@pytest.fixture(autouse=True)
def _clean(fake: FakeAliyun) -> None:
    fake.reset()


def gotrue(url: str, version: tuple[int, int, int] = NEW, secrets: str = SECRET, **kw: Any) -> GoTrueHookCaller:
    return GoTrueHookCaller(url + "/hooks/send-sms", secrets, version=version, **kw)


def outbox_row(database: Database, phone: str) -> dict[str, Any]:
    row: dict[str, Any] = database.one(
        "select to_jsonb(o) from sms.outbox as o where o.phone = %s order by created_at desc limit 1", [phone]
    )
    return row


@pytest.mark.parametrize("version", [(2, 150, 0), (2, 170, 0), (2, 185, 0), NEW], ids=str)
def test_otp_is_delivered_for_every_payload_shape(
    sidecar: str, fake: FakeAliyun, database: Database, version: tuple[int, int, int]
) -> None:
    phone = fresh_phone()
    caller = gotrue(sidecar, max(version, (2, 164, 0)))  # the emulator reads answers as v2.164+ does
    result = caller.call(otp_login(version, phone=phone, otp="042517"))
    assert result.outcome == "success", result
    (sent,) = fake.wait_for_sends(1)
    assert sent.phone_numbers == phone[2:]  # mainland numbers go without the country code
    assert (sent.sign_name, sent.template_code, sent.template_param) == (SIGN, TEMPLATE, {"code": "042517"})
    row = outbox_row(database, phone)
    assert (row["status"], row["code"], row["source"]) == ("sent", None, "auth_hook")
    assert row["gotrue_shape"] == {(2, 150, 0): "user+sms", (2, 170, 0): "user+sms", (2, 185, 0): "sms.phone"}.get(
        version, "metadata"
    )
    ledger = database.one("select to_jsonb(d) from sms.deliveries as d where d.message_id = %s", [row["id"]])
    assert ledger["outcome"] == "accepted" and ledger["biz_id"] == sent.biz_id
    assert ledger["provider_request_id"] == sent.request_id and sent.out_id == str(ledger["id"])


def test_the_flat_payload_of_the_oldest_gotrue(sidecar: str, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    flat = {"user_id": str(uuid.uuid4()), "phone": phone, "otp": "123456"}
    assert gotrue(sidecar, OLD).call(flat).outcome == "success"
    assert fake.wait_for_sends(1)[0].phone_numbers == phone[2:]


def test_phone_change_texts_the_new_number(sidecar: str, fake: FakeAliyun) -> None:
    old, new = fresh_phone(), fresh_phone()
    assert gotrue(sidecar).call(phone_change(NEW, old_phone=old, new_phone=new)).outcome == "success"
    assert [s.phone_numbers for s in fake.wait_for_sends(1)] == [new[2:]]


def test_mfa_texts_the_factor_phone_with_the_mfa_template(sidecar: str, fake: FakeAliyun, database: Database) -> None:
    database.execute("insert into sms.templates values ('mfa', 'MFA签名', 'SMS_300000003') on conflict do nothing")
    factor = fresh_phone()
    try:
        assert gotrue(sidecar).call(mfa_challenge(NEW, factor_phone=factor, user_phone="")).outcome == "success"
    finally:
        database.execute("delete from sms.templates where purpose = 'mfa'")
    (sent,) = fake.wait_for_sends(1)
    assert (sent.phone_numbers, sent.sign_name, sent.template_code) == (factor[2:], "MFA签名", "SMS_300000003")


def test_user_phone_is_the_fallback_only_without_sms_phone(sidecar: str, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    payload = otp_login((2, 170, 0), phone=phone)  # before v2.180: no sms.phone
    assert "phone" not in payload["sms"]
    assert gotrue(sidecar, (2, 170, 0)).call(payload).outcome == "success"
    assert fake.wait_for_sends(1)[0].phone_numbers == phone[2:]


def test_international_numbers_use_the_international_template(sidecar: str, fake: FakeAliyun, settings: Any) -> None:
    settings(allowed_country_codes=["86", "852"])
    hong_kong = f"8529{uuid.uuid4().int % 10**7:07d}"
    assert gotrue(sidecar).call(otp_login(NEW, phone=hong_kong)).outcome == "success"
    (sent,) = fake.wait_for_sends(1)
    assert (sent.phone_numbers, sent.sign_name, sent.template_code) == (hong_kong, INTL_SIGN, INTL_TEMPLATE)


@pytest.mark.parametrize("version", [NEW, OLD], ids=["metadata", "no-metadata"])
def test_numbers_outside_the_allow_list_are_refused(sidecar: str, fake: FakeAliyun, version: Any) -> None:
    result = gotrue(sidecar, version).call(otp_login(version, phone="12025550123"))
    assert result.outcome != "success"
    if version == NEW:
        assert result.status == 400 and "不支持" in (result.message or "")
    assert fake.requests_seen == 0


# --- signatures -------------------------------------------------------------------------------------------


def test_gotrue_with_several_secrets_is_accepted(sidecar: str, fake: FakeAliyun) -> None:
    # GoTrue signs once per configured secret and joins them with ", "; ours is the second one.
    caller = gotrue(sidecar, secrets=f"{generate_secret()}|{OTHER_SECRET}")
    result = caller.call(otp_login(NEW, phone=fresh_phone()))
    assert result.outcome == "success"
    assert ", " in result.attempts[0].signature
    fake.wait_for_sends(1)


@pytest.mark.parametrize("secrets", [generate_secret(), ""], ids=["wrong-secret", "unsigned"])
def test_bad_signatures_get_401_and_send_nothing(sidecar: str, fake: FakeAliyun, secrets: str) -> None:
    result = gotrue(sidecar, secrets=secrets).call(otp_login(NEW, phone=fresh_phone()))
    assert result.attempts[-1].status == 401
    assert result.outcome != "success"
    assert fake.requests_seen == 0


@pytest.mark.parametrize("skew", [-301, 301])
def test_stale_or_future_timestamps_get_401(sidecar: str, fake: FakeAliyun, skew: int) -> None:
    result = gotrue(sidecar, clock=lambda: time.time() + skew).call(otp_login(NEW, phone=fresh_phone()))
    assert result.attempts[-1].status == 401 and fake.requests_seen == 0


def test_tampered_body_gets_401(sidecar: str, fake: FakeAliyun) -> None:
    body = go_json(otp_login(NEW, phone=fresh_phone()))
    msg_id, ts = str(uuid.uuid4()), int(time.time())
    signature = sign([SECRET], msg_id, ts, body)
    tampered = body.replace(b'"otp":"123456"', b'"otp":"654321"')
    assert tampered != body
    response = post(sidecar, tampered, {"webhook-id": msg_id, "webhook-timestamp": str(ts),
                                        "webhook-signature": signature})  # fmt: skip
    assert response.status_code == 401 and fake.requests_seen == 0


def post(base: str, body: bytes, headers: dict[str, str], path: str = "/hooks/send-sms") -> httpx.Response:
    return httpx.post(base + path, content=body, headers={"content-type": "application/json", **headers}, timeout=10)


def test_oversized_bodies_get_413(sidecar: str, fake: FakeAliyun) -> None:
    body = b'{"padding": "' + b"x" * 70_000 + b'"}'
    response = post(sidecar, body, signed_headers(body, SECRET))
    assert response.status_code == 413 and fake.requests_seen == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"user": {"id": "x", "phone": ""}, "sms": {"otp": "123456"}},  # no number anywhere
        {"user": {"phone": "8613012345678"}, "sms": {"otp": "12ab56", "phone": "8613012345678"}},
        {"user": {"phone": "8613012345678"}, "sms": {"phone": "8613012345678"}},
        {"nothing": True},
        [1, 2, 3],
    ],
    ids=["no-phone", "non-digit-otp", "no-otp", "unknown-shape", "array"],
)
def test_malformed_payloads_are_refused_clearly(sidecar: str, fake: FakeAliyun, payload: Any) -> None:
    body = json.dumps(payload).encode()
    response = post(sidecar, body, signed_headers(body, SECRET))
    assert response.status_code == 400
    assert response.json()["error"]["http_code"] == 400 and response.json()["error"]["message"]
    with_metadata = {"metadata": make_metadata(), **payload} if isinstance(payload, dict) else None
    if with_metadata:
        result = gotrue(sidecar).call(with_metadata)
        assert result.outcome == (400, result.message) and result.message
    assert fake.requests_seen == 0


def test_non_json_is_400(sidecar: str) -> None:
    body = b"not json"
    assert post(sidecar, body, signed_headers(body, SECRET)).status_code == 400


def test_the_original_deno_path_is_served_too(sidecar: str, fake: FakeAliyun) -> None:
    caller = GoTrueHookCaller(sidecar + "/functions/v1/supabase-aliyun-sms-sender", SECRET, version=NEW)
    assert caller.call(otp_login(NEW, phone=fresh_phone())).outcome == "success"
    fake.wait_for_sends(1)


# --- duplicates and limits --------------------------------------------------------------------------------


def test_a_retried_event_sends_one_sms(sidecar: str, fake: FakeAliyun) -> None:
    caller = gotrue(sidecar, OLD)
    body = caller.encode(otp_login(OLD, phone=fresh_phone()))
    first = post(sidecar, body, signed_headers(body, SECRET))
    second = post(sidecar, body, signed_headers(body, SECRET))  # GoTrue: new webhook-id, same bytes
    assert (first.status_code, first.json(), second.status_code, second.json()) == (200, {}, 200, {})
    time.sleep(0.2)
    assert len(fake.sends) == 1


def test_the_same_uuid_is_one_event_even_if_the_body_differs(sidecar: str, fake: FakeAliyun) -> None:
    metadata = make_metadata()
    phone = fresh_phone()
    assert gotrue(sidecar).call(otp_login(NEW, phone=phone, metadata=metadata)).outcome == "success"
    again = otp_login(NEW, phone=phone, metadata={**metadata, "time": "2026-11-21T00:00:00Z"})
    assert gotrue(sidecar).call(again).outcome == "success"
    assert len(fake.sends) == 1


def test_concurrent_duplicates_send_once(sidecar: str, fake: FakeAliyun) -> None:
    fake.set_default(Delay(0.3))
    body = gotrue(sidecar).encode(otp_login(NEW, phone=fresh_phone()))
    results: list[httpx.Response] = []

    def fire() -> None:
        results.append(post(sidecar, body, signed_headers(body, SECRET)))

    threads = [threading.Thread(target=fire) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.json() for r in results] == [{}] * 5
    assert len(fake.sends) == 1


def test_a_failed_event_retried_fails_again_without_sending(sidecar: str, fake: FakeAliyun) -> None:
    fake.fail_next(BusinessError("isv.MOBILE_NUMBER_ILLEGAL"))
    body = gotrue(sidecar).encode(otp_login(NEW, phone=fresh_phone()))
    first = post(sidecar, body, signed_headers(body, SECRET)).json()
    second = post(sidecar, body, signed_headers(body, SECRET)).json()
    assert first["error"]["http_code"] == second["error"]["http_code"] == 400
    assert fake.requests_seen == 1


def test_per_phone_cooldown_applies_to_the_hook(sidecar: str, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    assert gotrue(sidecar).call(otp_login(NEW, phone=phone)).outcome == "success"
    result = gotrue(sidecar).call(otp_login(NEW, phone=phone, otp="654321"))
    assert result.status == 429 and "60" in (result.message or "")
    assert len(fake.sends) == 1


def wait_in(message: str | None) -> str:
    found = re.search(r"in (\d+) seconds", message or "")
    assert found, message
    return found.group(1)


def test_hourly_limit_per_phone_applies_to_the_hook(
    sidecar: str, fake: FakeAliyun, database: Database, settings: Any
) -> None:
    settings(resend_cooldown_seconds=None)  # hourly_limit_per_phone at its default, 5
    phone = fresh_phone()
    for n in range(5):
        assert gotrue(sidecar).call(otp_login(NEW, phone=phone, otp=f"10000{n}")).outcome == "success"
    database.execute(
        "update sms.outbox set created_at = created_at - interval '50 minutes' where id = "
        "(select id from sms.outbox where phone = %s order by created_at limit 1)",
        [phone],
    )
    result = gotrue(sidecar).call(otp_login(NEW, phone=phone, otp="100005"))
    # The user is told the wait; the limit named is the one the hook's check hit.
    assert result.status == 429 and 595 <= int(wait_in(result.message)) <= 600
    assert "hourly_limit_per_phone" in auth_limits_hit(database, phone)[0]
    assert len(fake.sends) == 5
    # Older GoTrue gets a non-2xx status it cannot read as success.
    old = gotrue(sidecar, OLD).call(otp_login(OLD, phone=phone, otp="100006"))
    assert old.outcome != "success" and old.attempts[-1].status not in (200, 429, 503)
    assert len(fake.sends) == 5


def test_per_ip_limit_applies_to_the_hook(sidecar: str, fake: FakeAliyun, settings: Any) -> None:
    settings(hourly_limit_per_ip=1)
    ip = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    calls = [otp_login(NEW, phone=fresh_phone(), metadata=make_metadata(ip_address=ip)) for _ in range(2)]
    assert gotrue(sidecar).call(calls[0]).outcome == "success"
    assert gotrue(sidecar).call(calls[1]).status == 429
    assert len(fake.sends) == 1


def test_limits_fail_on_old_gotrue_without_reading_as_success(sidecar: str, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    assert gotrue(sidecar, OLD).call(otp_login(OLD, phone=phone)).outcome == "success"
    result = gotrue(sidecar, OLD).call(otp_login(OLD, phone=phone, otp="999999"))
    assert result.outcome != "success"
    assert result.attempts[-1].status not in (429, 503)  # GoTrue would retry or misreport those


def test_test_numbers_are_never_texted(sidecar: str, fake: FakeAliyun, settings: Any) -> None:
    phone = fresh_phone()
    settings(test_codes={phone: "123456"})
    assert gotrue(sidecar).call(otp_login(NEW, phone=phone)).outcome == "success"
    assert fake.requests_seen == 0


# --- provider failures ------------------------------------------------------------------------------------

FAILURES = [
    (flow_control("minute"), 429, "1 min"),
    (flow_control("hour"), 429, "1 h"),
    (BusinessError("isv.MOBILE_NUMBER_ILLEGAL"), 400, "无法接收"),
    (BusinessError("isv.AMOUNT_NOT_ENOUGH"), 500, "暂不可用"),
    (BusinessError("isv.SMS_TEMPLATE_ILLEGAL"), 500, "暂不可用"),
    (BusinessError("isp.SYSTEM_ERROR"), 502, "暂时不可用"),
    (GatewayError(503, "ServiceUnavailable"), 502, "暂时不可用"),
    (GatewayError(400, "SignatureDoesNotMatch"), 500, "暂不可用"),
]


@pytest.mark.parametrize(("fault", "status", "text"), FAILURES, ids=[f"{f[1]}-{i}" for i, f in enumerate(FAILURES)])
def test_provider_failures_reach_the_user_with_a_fitting_status(
    sidecar: str, fake: FakeAliyun, fault: Any, status: int, text: str
) -> None:
    fake.fail_next(fault)
    result = gotrue(sidecar).call(otp_login(NEW, phone=fresh_phone()))
    assert result.outcome == (status, result.message)
    assert text in (result.message or "")
    assert fake.requests_seen == 1  # never retried: none of these is a connect failure


@pytest.mark.parametrize(("fault", "status", "text"), FAILURES, ids=[f"{f[1]}-{i}" for i, f in enumerate(FAILURES)])
def test_no_failure_reads_as_success_on_old_gotrue(
    sidecar: str, fake: FakeAliyun, fault: Any, status: int, text: str
) -> None:
    fake.fail_next(fault)
    result = gotrue(sidecar, OLD).call(otp_login(OLD, phone=fresh_phone()))
    assert result.outcome != "success"
    assert result.attempts[-1].status not in (200, 429, 503)


def test_alerts_are_logged_for_operator_errors(sidecar: str, fake: FakeAliyun, caplog: Any) -> None:
    fake.fail_next(BusinessError("isv.AMOUNT_NOT_ENOUGH"))
    with caplog.at_level(logging.INFO):
        gotrue(sidecar).call(otp_login(NEW, phone=fresh_phone()))
    assert any(r.levelno == logging.CRITICAL and "isv.AMOUNT_NOT_ENOUGH" in r.getMessage() + str(r.__dict__)
               for r in caplog.records)  # fmt: skip


def test_a_hanging_provider_is_answered_within_four_seconds(sidecar: str, fake: FakeAliyun, database: Database) -> None:
    fake.fail_next(Delay(8))
    phone = fresh_phone()
    started = time.monotonic()
    result = gotrue(sidecar).call(otp_login(NEW, phone=phone))
    elapsed = time.monotonic() - started
    assert elapsed < 4.5, elapsed
    assert result.outcome == (504, result.message)
    assert len(result.attempts) == 1  # GoTrue got an answer in time: no retry
    assert outbox_row(database, phone)["status"] == "failed"
    assert fake.requests_seen == 1  # a read timeout is never resent


def test_a_dropped_connection_is_not_resent(sidecar: str, fake: FakeAliyun) -> None:
    fake.fail_next(Drop(accepted=True))
    result = gotrue(sidecar).call(otp_login(NEW, phone=fresh_phone()))
    assert result.outcome == (504, result.message)
    time.sleep(0.2)
    assert fake.requests_seen == 1


def test_a_refused_connection_is_retried_once_then_fails(database: Database) -> None:
    phone = fresh_phone()
    with start(database, refused_endpoint()) as url:
        started = time.monotonic()
        result = gotrue(url).call(otp_login(NEW, phone=phone))
        assert time.monotonic() - started < 4.5
    assert result.outcome == (503, result.message)
    attempts = database.execute(
        "select d.outcome, d.provider_code from sms.deliveries as d join sms.outbox as o on o.id = d.message_id"
        " where o.phone = %s order by d.id", [phone],
    )  # fmt: skip
    assert attempts == [("retry", "ConnectFailed"), ("retry", "ConnectFailed")]


def test_otp_longer_than_aliyun_accepts_is_refused_before_sending(sidecar: str, fake: FakeAliyun) -> None:
    result = gotrue(sidecar).call(otp_login(NEW, phone=fresh_phone(), otp="12345678"))
    assert result.outcome == (500, result.message)
    assert fake.requests_seen == 0


# --- logs, health, metrics --------------------------------------------------------------------------------


def test_logs_never_carry_the_code_or_the_full_number(sidecar: str, fake: FakeAliyun, caplog: Any) -> None:
    phone = fresh_phone()
    with caplog.at_level(logging.DEBUG):
        gotrue(sidecar).call(otp_login(NEW, phone=phone, otp="918273"))
        fake.fail_next(BusinessError("isv.MOBILE_NUMBER_ILLEGAL"))
        gotrue(sidecar).call(otp_login(NEW, phone=fresh_phone(), otp="918274"))
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "hook SMS accepted" in text
    for secret in ("918273", "918274", phone, phone[2:], SECRET, AK_SECRET):
        assert secret not in text
    assert f"+86*******{phone[-4:]}" in text


def test_health_readiness_and_metrics(sidecar: str) -> None:
    assert httpx.get(sidecar + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(sidecar + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    text = httpx.get(sidecar + "/metrics").text
    assert "sms_hook_requests_total" in text and "sms_provider_duration_seconds_bucket" in text


def test_without_a_database_the_hook_fails_fast_and_readyz_says_so(fake: FakeAliyun) -> None:
    aliyun = aliyun_config(fake.endpoint)
    config = Config(database_url="postgresql://sms_sidecar@127.0.0.1:1/postgres?connect_timeout=1",
                    hook_secrets=parse_secrets(SECRET), provider="aliyun", aliyun=aliyun)  # fmt: skip
    with run_app(create_app(config, AliyunProvider(aliyun))) as url:
        ready = httpx.get(url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "database" in ready.json()["reason"]
        started = time.monotonic()
        result = gotrue(url).call(otp_login(NEW, phone=fresh_phone()))
        assert time.monotonic() - started < 4.5
    assert result.outcome == (503, result.message)
    assert fake.requests_seen == 0


def test_without_a_configured_secret_every_request_is_refused(database: Database, fake: FakeAliyun) -> None:
    aliyun = aliyun_config(fake.endpoint)
    config = Config(database_url=sidecar_url(database), hook_secrets=(), provider="aliyun", aliyun=aliyun)
    with run_app(create_app(config, AliyunProvider(aliyun))) as url:
        result = gotrue(url).call(otp_login(NEW, phone=fresh_phone()))
    assert result.attempts[-1].status == 401 and fake.requests_seen == 0


# --------------------------------------------------------------------------------------------------
# Delivery under load: no thread per send, whole-call deadlines, a bounded number in flight


def test_no_send_occupies_a_thread(sidecar: str, fake: FakeAliyun) -> None:
    """48 sends wait on the provider at once: the sidecar's threads stay as few as when idle."""

    def sidecar_threads() -> list[str]:
        # Not the fake's (a thread per request it serves) nor this test's callers.
        return [t.name for t in threading.enumerate()
                if "process_request_thread" not in t.name and not t.name.startswith("callers")]  # fmt: skip

    fake.latency = 1.0
    try:
        idle = len(sidecar_threads())
        busiest: list[str] = []
        with ThreadPoolExecutor(48, thread_name_prefix="callers") as callers:
            futures = [callers.submit(gotrue(sidecar).call, otp_login(NEW, phone=fresh_phone())) for _ in range(48)]
            while not all(f.done() for f in futures):
                busiest = max(busiest, sidecar_threads(), key=len)
                time.sleep(0.05)
            results = [f.result() for f in futures]
    finally:
        fake.latency = 0.0
    assert [r.outcome for r in results] == ["success"] * 48
    assert len(busiest) <= idle + 6, (idle, sorted(busiest))  # at most asyncio's resolver threads


def test_a_trickling_provider_cannot_hold_hooks_past_their_budget(sidecar: str, fake: FakeAliyun) -> None:
    fake.drip = 1.0  # one byte a second: every read succeeds, the answer never completes in time
    try:
        with ThreadPoolExecutor(20) as callers:
            started = time.monotonic()
            results = list(callers.map(lambda _: gotrue(sidecar).call(otp_login(NEW, phone=fresh_phone())), range(20)))
            elapsed = time.monotonic() - started
    finally:
        fake.drip = 0.0
    assert elapsed < 4.8, elapsed
    # Accepted by the fake (it records the send first), but no answer: unknown, so reported and never resent.
    assert {r.outcome for r in results} == {(504, results[0].message)}
    started = time.monotonic()
    assert gotrue(sidecar).call(otp_login(NEW, phone=fresh_phone())).outcome == "success"
    assert time.monotonic() - started < 2.0


def test_beyond_the_in_flight_limit_a_hook_is_answered_at_once(database: Database, fake: FakeAliyun) -> None:
    aliyun = aliyun_config(fake.endpoint)
    config = Config(database_url=sidecar_url(database), hook_secrets=parse_secrets(SECRET), provider="aliyun",
                    aliyun=aliyun, max_in_flight=2)  # fmt: skip
    fake.latency = 2.0
    try:
        with run_app(create_app(config, AliyunProvider(aliyun, max_connections=2))) as url:
            with ThreadPoolExecutor(6) as callers:
                slow = [callers.submit(gotrue(url).call, otp_login(NEW, phone=fresh_phone())) for _ in range(2)]
                time.sleep(0.5)  # both slots are taken now
                started = time.monotonic()
                refused = gotrue(url).call(otp_login(NEW, phone=fresh_phone()))
                waited = time.monotonic() - started
                assert [f.result().outcome for f in slow] == ["success", "success"]
    finally:
        fake.latency = 0.0
    assert refused.outcome == (503, refused.message) and waited < 1.0, (refused.outcome, waited)
