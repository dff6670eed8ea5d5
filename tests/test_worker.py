"""The delivery worker with real processes, the real database and the fake Aliyun: latency, crashes,
scale-out, provider faults and a database restart. Every test ends by counting what the fake
received per phone: nothing lost, nothing sent twice."""

from __future__ import annotations

import signal
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.support.aliyun import aliyun_env, in_process
from tests.support.builders import fresh_phone
from tests.support.database import Database, all_sent
from tests.support.fake_aliyun import BusinessError, Delay, Drop, FakeAliyun
from tests.support.postgrest import SERVICE, PostgREST
from tests.support.servers import SidecarProcess, sidecar_url, wait_until

pytestmark = pytest.mark.usefixtures("isolated")


def process(database: Database, fake: FakeAliyun, **env: str) -> SidecarProcess:
    return SidecarProcess({
        "DATABASE_URL": sidecar_url(database),
        "SMS_PROVIDER": "aliyun",
        **aliyun_env(fake),
        "SMS_WORKER_SWEEP_SECONDS": "0.2",
        "SMS_WORKER_BACKOFF_SECONDS": "0",
        **env,
    })  # fmt: skip


def enqueue(api: PostgREST, count: int) -> list[str]:
    phones = [fresh_phone() for _ in range(count)]
    for phone in phones:
        response = api.rpc("request_phone_code", {"phone": phone}, SERVICE)
        assert response.status == 200, response.body
    return phones


def assert_each_sent_once(fake: FakeAliyun, phones: list[str]) -> None:
    counts = Counter("86" + s.phone_numbers for s in fake.sends)
    assert set(counts) == set(phones), f"missing {len(set(phones) - set(counts))}"
    assert counts.most_common(1)[0][1] == 1, counts.most_common(3)


def test_a_requested_code_reaches_aliyun_in_milliseconds(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    latencies = []
    with in_process(database, fake):
        time.sleep(0.5)  # let the LISTEN connection settle
        for i in range(20):
            phone = fresh_phone()
            before = time.time()
            assert api.rpc("request_phone_code", {"phone": phone}, SERVICE).status == 200
            (sent,) = [s for s in fake.wait_for_sends(i + 1, timeout=5) if "86" + s.phone_numbers == phone]
            latencies.append(sent.received_at - before)
    assert statistics.median(latencies) < 0.25, latencies
    assert max(latencies) < 1.0, latencies


def test_delivered_codes_leave_only_the_hash(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    with in_process(database, fake):
        phones = enqueue(api, 5)
        wait_until(lambda: all_sent(database, phones), 10, "delivery")
    assert database.one("select count(*) from sms.outbox where phone = any(%s) and code is not null", [phones]) == 0
    codes = {s.template_param["code"] for s in fake.sends}
    leftovers = database.one("select count(*) from sms.outbox where code = any(%s)", [list(codes)])
    assert leftovers == 0


def test_sigkill_mid_stream_loses_nothing_and_sends_nothing_twice(
    api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    phones = enqueue(api, 300)
    fake.set_default(Delay(0.05))  # keep sends in flight when the kill lands
    first = process(database, fake, SMS_WORKER_LEASE_SECONDS="3", SMS_WORKER_CONCURRENCY="8")
    with first:
        fake.wait_for_sends(60, timeout=30)
        assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    in_flight = database.one("select count(*) from sms.outbox where phone = any(%s) and status = 'sending'", [phones])
    fake.set_default(None)
    with process(database, fake, SMS_WORKER_LEASE_SECONDS="3"):
        wait_until(lambda: all_sent(database, phones), 60, "every message after the restart")
    assert_each_sent_once(fake, phones)
    assert in_flight > 0, "the kill should have caught some messages mid-send"
    # The ones caught mid-send were looked up at Aliyun (by OutId) instead of being sent again.
    reconciled = database.one(
        "select count(*) from sms.deliveries as d join sms.outbox as o on o.id = d.message_id"
        " where o.phone = any(%s) and d.provider_code = 'RECONCILED'", [phones],
    )  # fmt: skip
    assert reconciled > 0


def test_two_replicas_share_the_queue_exactly_once(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    fake.set_default(Delay(0.01))
    with process(database, fake), process(database, fake):
        phones = enqueue(api, 300)  # both are listening: each notification wakes both
        wait_until(lambda: all_sent(database, phones), 60, "every message")
    assert_each_sent_once(fake, phones)
    workers = database.one(
        "select count(distinct d.worker) from sms.deliveries as d join sms.outbox as o on o.id = d.message_id"
        " where o.phone = any(%s)", [phones],
    )  # fmt: skip
    assert workers == 2


def test_sigterm_finishes_in_flight_sends_and_exits(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    phones = enqueue(api, 40)
    fake.set_default(Delay(0.3))
    sidecar = process(database, fake, SMS_WORKER_CONCURRENCY="4")
    with sidecar:
        fake.wait_for_sends(4, timeout=20)
        started = time.monotonic()
        # uvicorn re-raises the signal after its graceful shutdown, so the status is -SIGTERM either way.
        assert sidecar.kill(signal.SIGTERM) == -signal.SIGTERM
        assert time.monotonic() - started < 10
        assert '"sidecar stopped"' in sidecar.output()
    assert database.one("select count(*) from sms.outbox where phone = any(%s) and status = 'sending'", [phones]) == 0
    fake.set_default(None)
    with process(database, fake):
        wait_until(lambda: all_sent(database, phones), 30, "the rest")
    assert_each_sent_once(fake, phones)


def test_transient_failures_are_retried_until_sent(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    fake.fail_phone(phone[2:], BusinessError("isp.SYSTEM_ERROR"), times=2)
    with in_process(database, fake):
        enqueue_one(api, phone)
        wait_until(lambda: all_sent(database, [phone]), 20, "the retried message")
    outcomes = delivery_outcomes(database, phone)
    assert outcomes == [("retry", "isp.SYSTEM_ERROR"), ("retry", "isp.SYSTEM_ERROR"), ("accepted", "OK")]


def test_retries_stop_at_the_limit(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    fake.fail_phone(phone[2:], BusinessError("isp.SYSTEM_ERROR"))
    with in_process(database, fake, worker={"max_attempts": 3}):
        request_id = enqueue_one(api, phone)
        wait_until(lambda: status_of(api, request_id)["status"] == "failed", 20, "giving up")
    assert len(delivery_outcomes(database, phone)) == 3


def test_permanent_failures_fail_at_once_and_say_why(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    fake.fail_phone(phone[2:], BusinessError("isv.MOBILE_NUMBER_ILLEGAL"))
    with in_process(database, fake):
        request_id = enqueue_one(api, phone)
        wait_until(lambda: status_of(api, request_id)["status"] == "failed", 10, "the failure")
    assert status_of(api, request_id)["error"]
    assert delivery_outcomes(database, phone) == [("rejected", "isv.MOBILE_NUMBER_ILLEGAL")]
    assert database.one("select code from sms.outbox where phone = %s", [phone]) is None


def test_a_dropped_reply_is_reconciled_not_resent(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    fake.fail_phone(phone[2:], Drop(accepted=True), times=1)
    with in_process(database, fake):
        enqueue_one(api, phone)
        wait_until(lambda: all_sent(database, [phone]), 20, "reconciliation")
    assert [s.phone_numbers for s in fake.sends] == [phone[2:]]
    assert delivery_outcomes(database, phone) == [("ambiguous", "NoResponse"), ("accepted", "RECONCILED")]


def test_a_lost_ambiguous_send_is_sent_again_after_checking(
    api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    phone = fresh_phone()
    fake.fail_phone(phone[2:], Drop(accepted=False), times=1)  # the request never got through
    with in_process(database, fake):
        enqueue_one(api, phone)
        wait_until(lambda: all_sent(database, [phone]), 20, "the resend")
    assert [s.phone_numbers for s in fake.sends] == [phone[2:]]
    assert delivery_outcomes(database, phone) == [("ambiguous", "NoResponse"), ("accepted", "OK")]


def test_a_database_restart_mid_stream(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    assert database.cluster is not None, "this drill restarts the database; it needs the local cluster"
    with in_process(database, fake) as url:
        first = enqueue(api, 50)
        database.cluster.crash()
        try:
            assert httpx.get(url + "/readyz", timeout=10).status_code == 503
        finally:
            database.cluster.start_again()
        api.pool.check()  # PostgREST reconnects on its own; the stand-in's pool is told to

        wait_until(lambda: httpx.get(url + "/readyz", timeout=10).status_code == 200, 30, "readiness")
        second = enqueue(api, 50)
        wait_until(lambda: all_sent(database, first + second), 60, "every message after the restart")
    # Messages queued before the crash were committed, so none is lost; none is sent twice.
    assert_each_sent_once(fake, first + second)


def enqueue_one(api: PostgREST, phone: str) -> str:
    response = api.rpc("request_phone_code", {"phone": phone}, SERVICE)
    assert response.status == 200, response.body
    return str(response.body["request_id"])


def status_of(api: PostgREST, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = api.rpc("phone_code_status", {"request_id": request_id}, SERVICE).body
    return body


def delivery_outcomes(database: Database, phone: str) -> list[tuple[str, str]]:
    return [
        (outcome, code)
        for outcome, code in database.execute(
            "select d.outcome, d.provider_code from sms.deliveries as d join sms.outbox as o on o.id = d.message_id"
            " where o.phone = %s order by d.id",
            [phone],
        )  # fmt: skip
    ]
