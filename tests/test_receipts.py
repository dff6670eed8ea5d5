"""Delivery receipts end to end: codes requested as supabase-js requests them, sent by the real
sidecar to the fake Aliyun, whose SmsReport pushes (success, carrier failure, repeats, reordering,
strangers, hundreds at once, malformed, a wrong token, the database down) reach
POST /aliyun/sms-report/{token}; the verdict is read back through public.phone_code_status."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sidecar import store
from sidecar.webhook import parse_secrets
from tests.support.aliyun import in_process
from tests.support.builders import fresh_phone
from tests.support.codes import delivered_codes
from tests.support.database import Database, all_sent
from tests.support.fake_aliyun import FakeAliyun, Send, push_receipts, push_until_acknowledged
from tests.support.gotrue import GoTrueHookCaller, generate_secret, otp_login
from tests.support.postgrest import SERVICE, Caller, PostgREST, user
from tests.support.servers import wait_until

pytestmark = pytest.mark.usefixtures("isolated")

TOKEN = "receipt-token-0123456789abcdef"
HOOK_SECRET = generate_secret()
ACK = {"code": 0, "msg": "成功"}


def start(database: Database, fake: FakeAliyun, *, token: str | None = TOKEN) -> Any:
    return in_process(database, fake, report_token=token, hook_secrets=parse_secrets(HOOK_SECRET))


@pytest.fixture(scope="module")
def sidecar(database: Database, fake: FakeAliyun) -> Iterator[str]:
    with start(database, fake) as url:
        yield url


def report_url(base: str, token: str = TOKEN) -> str:
    return f"{base}/aliyun/sms-report/{token}"


def status(api: PostgREST, rid: str, caller: Caller = SERVICE) -> dict[str, Any]:
    response = api.rpc("phone_code_status", {"request_id": rid}, caller)
    assert response.status == 200, response.body
    body: dict[str, Any] = response.body
    return body


def sent_code(api: PostgREST, database: Database, fake: FakeAliyun, caller: Caller = SERVICE) -> tuple[str, Send]:
    """A code requested through the API and sent by the sidecar's worker: its request id and the send."""
    return delivered_codes(api, database, fake, 1, caller)[0]


def ledger(database: Database, send: Send) -> dict[str, Any]:
    row: dict[str, Any] = database.one("select to_jsonb(d) from sms.deliveries as d where d.id = %s",
                                       [int(send.out_id or 0)])  # fmt: skip
    return row


def test_a_delivered_code_reads_delivered_true(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    caller = user()
    rid, send = sent_code(api, database, fake, caller)
    assert status(api, rid, caller) == {"status": "sent", "error": None, "delivered": None}

    assert push_receipts(report_url(sidecar), [fake.receipt(send, after=3)]) == (200, ACK)

    assert status(api, rid, caller) == {"status": "sent", "error": None, "delivered": True}
    row = ledger(database, send)
    assert (row["delivered"], row["carrier_code"], row["receipt_source"]) == (True, "DELIVERED", "push")
    assert row["receipt_latency_ms"] == 3000  # send_time to report_time, on Aliyun's clock
    assert row["reported_at"] is not None


def test_a_carrier_failure_reads_false_with_a_reason_and_never_the_number(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    caller = user()
    rid, send = sent_code(api, database, fake, caller)
    number = send.phones[0]
    quoted = f"用户 {number} 关机 / +86 {number[:3]}-{number[3:7]}-{number[7:]}"  # a carrier quoting the number
    receipt = fake.receipt(send, success=False, err_code="MK:0001", err_msg=quoted)
    assert push_receipts(report_url(sidecar), [receipt]) == (200, ACK)

    answer = status(api, rid, caller)
    assert answer == {"status": "sent", "delivered": False,
                      "error": "not delivered by the carrier: MK:0001 (用户 # 关机 / #)"}  # fmt: skip
    row = ledger(database, send)
    assert (row["carrier_code"], row["carrier_message"]) == ("MK:0001", "用户 # 关机 / #")  # the number is gone


def test_another_caller_cannot_read_the_verdict(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    rid, send = sent_code(api, database, fake, user())
    push_receipts(report_url(sidecar), [fake.receipt(send)])
    assert api.rpc("phone_code_status", {"request_id": rid}, user()).status == 404


def test_repeats_and_reordering_change_nothing(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    rid, send = sent_code(api, database, fake)
    early_failure = fake.receipt(send, success=False, err_code="MK:0005", after=2)
    late_success = fake.receipt(send, success=True, after=9)
    url = report_url(sidecar)

    # The newer report first, then the older one, then both again, then the newer one in one push twice.
    assert push_receipts(url, [late_success])[0] == 200
    assert push_receipts(url, [early_failure])[0] == 200
    assert push_receipts(url, [early_failure, late_success])[0] == 200
    assert push_receipts(url, [late_success, late_success])[0] == 200

    assert status(api, rid)["delivered"] is True
    row = ledger(database, send)
    assert (row["carrier_code"], row["receipt_latency_ms"]) == ("DELIVERED", 9000)

    # An older receipt arriving in one push before the newer one still loses to it.
    rid2, send2 = sent_code(api, database, fake)
    push_receipts(url, [fake.receipt(send2, success=True, after=1), fake.receipt(send2, success=False, after=4)])
    assert status(api, rid2) == {"status": "sent", "delivered": False,
                                 "error": "not delivered by the carrier: MK:0001 (用户关机或不在服务区)"}  # fmt: skip


def test_receipts_that_are_not_ours_are_acknowledged_and_change_nothing(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    rid, send = sent_code(api, database, fake)
    mine = fake.receipt(send)
    strangers = [
        {**mine, "out_id": ""},  # a send of another application without an OutId
        {**mine, "out_id": "order-42"},  # another application's OutId
        {**mine, "out_id": "999999999999"},  # no such ledger row
        {**mine, "biz_id": "111111111^0"},  # our id, but a BizId Aliyun never gave us: another deployment
        {**mine, "out_id": "-1"},
    ]
    before = database.one("select count(*) from sms.deliveries where delivered is not null")
    assert push_receipts(report_url(sidecar), strangers) == (200, ACK)
    assert database.one("select count(*) from sms.deliveries where delivered is not null") == before
    assert status(api, rid)["delivered"] is None
    metrics = httpx.get(sidecar + "/metrics").text
    assert re.search(r'sms_receipts_total\{code="",result="unknown"\} ([0-9.]+)', metrics)


def test_an_ambiguous_attempt_is_matched_by_its_number(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    """An attempt whose answer never came back has no BizId: the receipt's number must be the send's."""
    rid, send = sent_code(api, database, fake)
    database.execute("update sms.deliveries set biz_id = null where id = %s", [int(send.out_id or 0)])
    wrong_number = {**fake.receipt(send), "phone_number": "13900000000"}
    push_receipts(report_url(sidecar), [wrong_number])
    assert status(api, rid)["delivered"] is None
    push_receipts(report_url(sidecar), [fake.receipt(send)])
    assert status(api, rid)["delivered"] is True
    assert ledger(database, send)["biz_id"] == send.biz_id  # learnt from the receipt


def test_hundreds_of_receipts_in_one_push_are_one_round_trip(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = delivered_codes(api, database, fake, 300)
    receipts = [fake.receipt(send, success=i % 10 != 0) for i, (_, send) in enumerate(codes)]

    statements: list[str] = []
    real_call = store.call

    async def counting(pool: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        statements.append(query)
        return await real_call(pool, query, *args, **kwargs)

    monkeypatch.setattr(store, "call", counting)  # every statement of the Store goes through it
    assert push_receipts(report_url(sidecar), receipts, timeout=30) == (200, ACK)
    assert [q for q in statements if "record_receipts" in q] == ["select sms.record_receipts(%(receipts)s, %(source)s)"]
    assert [status(api, rid)["delivered"] for rid, _ in codes] == [i % 10 != 0 for i in range(300)]


MALFORMED = {
    "not JSON": b"receipts, please",
    "an object": b'{"biz_id": "1^0", "success": true}',
    "an array of strings": b'["DELIVERED"]',
    "no biz_id": b'[{"out_id": "1", "success": true, "report_time": "2026-12-06 10:00:00"}]',
    "success not a boolean": b'[{"biz_id": "1^0", "success": "yes", "report_time": "2026-12-06 10:00:00"}]',
    "no report_time": b'[{"biz_id": "1^0", "success": true}]',
    "a bad report_time": b'[{"biz_id": "1^0", "success": true, "report_time": "yesterday"}]',
    "a nested out_id": b'[{"biz_id": "1^0", "out_id": {"id": 1}, "success": true, '
    b'"report_time": "2026-12-06 10:00:00"}]',
    "a NUL": b'[{"biz_id": "1\\u0000", "success": true, "report_time": "2026-12-06 10:00:00"}]',
    "NaN": b'[{"biz_id": "1^0", "success": true, "report_time": "2026-12-06 10:00:00", "sms_size": NaN}]',
}


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_push_that_is_not_a_receipt_array_is_a_400_and_stores_nothing(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun, body: bytes
) -> None:
    rid, send = sent_code(api, database, fake)
    good = fake.receipt(send)
    status_code, answer = push_receipts(report_url(sidecar), body)
    assert status_code == 400 and answer["code"] == 1 and answer["msg"], answer
    # A malformed receipt beside a good one: the push is refused whole, so nothing is half-acknowledged.
    mixed = b"[" + __import__("json").dumps(good).encode() + b"," + body.strip(b"[]") + b"]"
    if body.startswith(b"[{"):
        assert push_receipts(report_url(sidecar), mixed)[0] == 400
    assert status(api, rid)["delivered"] is None


def test_an_oversized_push_is_a_413(sidecar: str) -> None:
    from sidecar.receipts import MAX_REPORT_BYTES

    big = b"[" + b" " * MAX_REPORT_BYTES + b"]"
    status_code, answer = push_receipts(report_url(sidecar), big)
    assert status_code == 413 and answer["code"] == 1


@pytest.mark.parametrize("token", ["wrong-token-0123456789abcdef", TOKEN[:-1], TOKEN + "x", "", "%00"])
def test_a_wrong_token_is_the_404_of_a_missing_path(sidecar: str, fake: FakeAliyun, token: str) -> None:
    missing = httpx.post(sidecar + "/no/such/path", content=b"[]")
    for method in ("POST", "GET", "PUT"):
        answer = httpx.request(method, report_url(sidecar, token), content=b"[]")
        assert (answer.status_code, answer.text, answer.headers["content-type"]) == (
            404, missing.text, missing.headers["content-type"])  # fmt: skip
    assert httpx.get(report_url(sidecar)).status_code == 405  # the right token: the path exists


def test_without_a_token_configured_there_is_no_endpoint(database: Database, fake: FakeAliyun) -> None:
    with start(database, fake, token=None) as url:
        for token in (TOKEN, "None", "null"):
            assert httpx.post(report_url(url, token), content=b"[]").status_code == 404


def test_the_database_down_during_a_push_is_a_503_and_the_retry_stores_it(
    api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    assert database.cluster is not None, "this drill stops the database; it needs the local cluster"
    with start(database, fake) as url:
        rid, send = sent_code(api, database, fake)
        receipt = fake.receipt(send)
        database.cluster.crash()
        try:
            status_code, answer = push_receipts(report_url(url), [receipt], timeout=30)
            assert status_code == 503 and answer["code"] == 1, answer
        finally:
            database.cluster.start_again()
        api.pool.check()
        # Aliyun pushes again later; by then the database is back.
        answers = push_until_acknowledged(report_url(url), [receipt], schedule=(0.5, 1, 2, 4, 8))
        assert answers[-1] == (200, ACK), answers
    assert status(api, rid)["delivered"] is True


def test_an_auth_hook_otp_gets_its_receipt(database: Database, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    with start(database, fake) as url:
        caller = GoTrueHookCaller(url + "/hooks/send-sms", HOOK_SECRET, version=(2, 196, 0))
        assert caller.call(otp_login((2, 196, 0), phone=phone, otp="204817")).outcome == "success"
        (send,) = fake.wait_for_sends(1)
        assert push_receipts(report_url(url), [fake.receipt(send, success=False, err_code="IC:0015")]) == (200, ACK)
    row = ledger(database, send)
    assert (row["delivered"], row["carrier_code"]) == (False, "IC:0015")
    log = database.one("select to_jsonb(l) from sms.delivery_log as l where l.out_id = %s", [row["id"]])
    assert (log["source"], log["delivered"], log["carrier_code"]) == ("auth_hook", False, "IC:0015")
    assert phone not in str(log) and log["phone_masked"].endswith(phone[-4:])


def test_a_grpc_code_gets_its_receipt(sidecar: str, database: Database, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    database.execute("set role sms_grpc")
    try:
        issued = database.one("select sms.grpc_send_code(%s, null, null)", [phone])
    finally:
        database.execute("reset role")
    wait_until(lambda: all_sent(database, [phone]), 10, "the gRPC code's send")
    (send,) = [s for s in fake.sends if "86" + s.phone_numbers == phone]
    assert push_receipts(report_url(sidecar), [fake.receipt(send)]) == (200, ACK)
    assert database.one("select bool_and(d.delivered) from sms.deliveries as d where d.message_id = %s",
                        [issued["message_id"]]) is True  # fmt: skip


def test_metrics_count_receipts_by_result_and_code_and_time_them(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    def value(text: str, pattern: str) -> float:
        found = re.search(pattern + r" ([0-9.e+]+)", text)
        return float(found.group(1)) if found else 0.0

    before = httpx.get(sidecar + "/metrics").text
    _, ok = sent_code(api, database, fake)
    _, failed = sent_code(api, database, fake)
    push_receipts(
        report_url(sidecar), [fake.receipt(ok, after=4), fake.receipt(failed, success=False, err_code="MK:0001")]
    )
    push_receipts(report_url(sidecar), [fake.receipt(ok, after=4)])
    after = httpx.get(sidecar + "/metrics").text
    for pattern, grew in [
        (r'sms_receipts_total\{code="DELIVERED",result="delivered"\}', 1),
        (r'sms_receipts_total\{code="MK:0001",result="undelivered"\}', 1),
        (r'sms_receipts_total\{code="",result="repeated"\}', 1),
        (r'sms_receipt_latency_seconds_bucket\{le="5.0",result="delivered"\}', 1),
        (r'sms_receipt_latency_seconds_bucket\{le="2.0",result="delivered"\}', 0),
        (r'sms_receipt_pushes_total\{result="stored"\}', 2),
    ]:
        assert value(after, pattern) - value(before, pattern) == grew, pattern


def test_the_delivered_within_gauges_read_the_database(
    api: PostgREST, database: Database, fake: FakeAliyun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar import worker

    monkeypatch.setattr(worker, "RECEIPT_STATS_SECONDS", 0.0)
    with start(database, fake) as url:
        sends = [sent_code(api, database, fake)[1] for _ in range(4)]
        push_receipts(report_url(url), [fake.receipt(sends[0], after=30), fake.receipt(sends[1], after=200),
                                        fake.receipt(sends[2], success=False)])  # fmt: skip
        # Into the gauges' window (accepted 10 to 40 minutes ago), and nothing else there.
        database.execute("update sms.outbox set created_at = created_at - interval '1 day'"
                         " where created_at > now() - interval '40 minutes'"
                         " and created_at < now() - interval '10 minutes'")  # fmt: skip
        database.execute("update sms.outbox set created_at = now() - interval '20 minutes'"
                         " where id in (select message_id from sms.deliveries where id = any(%s))",
                         [[int(s.out_id or 0) for s in sends]])  # fmt: skip

        def gauges() -> dict[str, float]:
            text = httpx.get(url + "/metrics").text
            return {name: float(v) for name, v in re.findall(r'^(sms_delivered_within_ratio\{minutes="\d+"\}|'
                                                             r"sms_undelivered_ratio|sms_receipt_window_sent) (\S+)$",
                                                             text, re.M)}  # fmt: skip

        wait_until(lambda: gauges().get("sms_receipt_window_sent") == 4, 10, "the receipt gauges")
        assert gauges() == {"sms_receipt_window_sent": 4.0, 'sms_delivered_within_ratio{minutes="1"}': 0.25,
                            'sms_delivered_within_ratio{minutes="5"}': 0.5,
                            'sms_delivered_within_ratio{minutes="10"}': 0.5, "sms_undelivered_ratio": 0.25}  # fmt: skip


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
def test_concurrent_pushes_of_the_same_receipts_store_each_once(
    sidecar: str, api: PostgREST, database: Database, fake: FakeAliyun, isolation: str
) -> None:
    """Aliyun retrying a push while the first is still being stored, at every isolation level."""
    sends = [sent_code(api, database, fake)[1] for _ in range(20)]
    receipts = [fake.receipt(s, success=i % 2 == 0) for i, s in enumerate(sends)]
    database.execute(f"alter role sms_sidecar set default_transaction_isolation = '{isolation}'")
    try:
        with start(database, fake) as url:
            answers: list[tuple[int, Any]] = []
            barrier = threading.Barrier(8)

            def push(i: int) -> None:
                barrier.wait()
                ordered = receipts if i % 2 else list(reversed(receipts))
                answers.append(push_receipts(report_url(url), ordered, timeout=30))

            threads = [threading.Thread(target=push, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        database.execute("alter role sms_sidecar reset default_transaction_isolation")
    assert answers == [(200, ACK)] * 8
    rows = database.execute("select delivered from sms.deliveries where id = any(%s) order by id",
                            [[int(s.out_id or 0) for s in sends]])  # fmt: skip
    assert [r[0] for r in rows] == [i % 2 == 0 for i in range(20)]
