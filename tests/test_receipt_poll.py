"""Receipts by polling (SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS): the sidecar asks the fake Aliyun's
QuerySendDetails about sends still without a receipt, paced, and stores what it says as a push would."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.aliyun import in_process
from tests.support.codes import delivered_codes
from tests.support.database import Database
from tests.support.fake_aliyun import FakeAliyun, GatewayError, push_receipts
from tests.support.postgrest import SERVICE, PostgREST
from tests.support.servers import wait_until

pytestmark = pytest.mark.usefixtures("isolated")

TOKEN = "poll-test-token-0123456789"


def polling(database: Database, fake: FakeAliyun, *, qps: float = 50.0, token: str | None = None) -> Any:
    # One second instead of the minute the environment insists on, so the test need not wait.
    worker = {"receipt_poll_after_seconds": 1, "receipt_poll_qps": qps}
    return in_process(database, fake, worker=worker, report_token=token)


def verdict(api: PostgREST, rid: str) -> Any:
    return api.rpc("phone_code_status", {"request_id": rid}, SERVICE).body


def test_polling_stores_delivered_and_failed_verdicts(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    with polling(database, fake):
        (ok_id, ok), (bad_id, bad), (waiting_id, waiting) = delivered_codes(api, database, fake, 3)
        fake.receipt(bad, success=False, err_code="MK:0004")  # what QuerySendDetails reports from now on
        waiting.send_status = 1  # still waiting for the carrier
        wait_until(lambda: verdict(api, ok_id)["delivered"] is True and verdict(api, bad_id)["delivered"] is False,
                   15, "the polled verdicts")  # fmt: skip
        assert verdict(api, bad_id)["error"] == "not delivered by the carrier: MK:0004"
        polls = "select receipt_polls from sms.deliveries where id = %s"
        wait_until(lambda: database.one(polls, [int(waiting.out_id or 0)]) == 3, 15, "three polls of the waiting one")
    assert verdict(api, waiting_id)["delivered"] is None
    rows = database.execute("select receipt_source, receipt_polls from sms.deliveries where id = any(%s) order by id",
                            [[int(s.out_id or 0) for s in (ok, bad)]])  # fmt: skip
    assert rows == [("query", 1), ("query", 1)]
    asked = [q for _, q in fake.queries if q.get("BizId") in (ok.biz_id, bad.biz_id, waiting.biz_id)]
    assert len(asked) == 5  # one each for the two verdicts, three for the one that never came
    assert all(q["PhoneNumber"] == s.phone_numbers for q in asked for s in (ok, bad, waiting) if q["BizId"] == s.biz_id)


def test_a_pushed_receipt_is_not_polled_for(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    with polling(database, fake, token=TOKEN) as url:
        ((rid, send),) = delivered_codes(api, database, fake, 1)
        assert push_receipts(f"{url}/aliyun/sms-report/{TOKEN}", [fake.receipt(send)])[0] == 200
        other = delivered_codes(api, database, fake, 1)[0][1]
        wait_until(lambda: any(q.get("BizId") == other.biz_id for _, q in fake.queries), 10, "the other's poll")
    assert not [q for _, q in fake.queries if q.get("BizId") == send.biz_id]
    assert verdict(api, rid)["delivered"] is True


def test_polling_is_paced_and_survives_provider_errors(api: PostgREST, database: Database, fake: FakeAliyun) -> None:
    fake.fail_next(GatewayError(503, "ServiceUnavailable"), times=2, action="QuerySendDetails")
    with polling(database, fake, qps=4.0):
        sends = delivered_codes(api, database, fake, 6)
        wait_until(lambda: all(verdict(api, rid)["delivered"] for rid, _ in sends), 30, "every verdict")
    times = sorted(t for t, q in fake.queries if q.get("BizId") in {s.biz_id for _, s in sends})
    assert len(times) == 8  # two failed, asked again a poll later
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.2, gaps  # 4 a second: 0.25 s apart, less the scheduler's jitter
