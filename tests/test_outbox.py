"""The outbox functions the sidecar calls, exercised as the sms_sidecar role."""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.support.builders import fresh_phone
from tests.support.database import Database, drain_queue
from tests.support.postgrest import SERVICE, PostgREST


@pytest.fixture
def sidecar(database: Database) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection with exactly the sms_sidecar role's privileges."""
    with psycopg.connect(database.url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("set role sms_sidecar")
        yield conn


@pytest.fixture(autouse=True)
def _empty_queue(database: Database, settings: Any) -> None:
    # Claims take whatever is due; start each test with nothing left over from others.
    drain_queue(database)
    settings(resend_cooldown_seconds=None, daily_limit_per_phone=None)


def enqueue(api: PostgREST, phone: str | None = None, purpose: str = "default") -> str:
    response = api.rpc("request_phone_code", {"phone": phone or fresh_phone(), "purpose": purpose}, SERVICE)
    assert response.status == 200, response.body
    return str(response.body["request_id"])


def claim(
    conn: psycopg.Connection[dict[str, Any]], worker: str = "w1", limit: int = 10, lease: int = 60
) -> list[dict[str, Any]]:
    return conn.execute("select * from sms.claim_messages(%s, %s, %s)", [worker, limit, lease]).fetchall()


def finish(conn: psycopg.Connection[dict[str, Any]], delivery_id: int, outcome: str, **kw: Any) -> str:
    """One result through sms.finish_deliveries, as the sidecar records it."""
    row = conn.execute("select sms.finish_deliveries(%s) as statuses",
                       [Jsonb([{"delivery_id": delivery_id, "outcome": outcome, **kw}])]).fetchone()  # fmt: skip
    assert row is not None
    (status,) = row["statuses"]
    return str(status)


def test_claim_hands_out_the_code_once(api: PostgREST, sidecar: Any, database: Database) -> None:
    request_id = enqueue(api)
    (message,) = claim(sidecar)
    assert message["attempt"] == 1 and message["source"] == "rpc" and message["purpose"] == "default"
    assert len(message["code"]) == 6 and message["needs_reconcile"] is False
    assert message["sign_name"] is None and message["template_code"] is None
    assert claim(sidecar) == []
    assert database.one("select status from sms.outbox where code_id = %s", [request_id]) == "sending"


def test_purpose_templates_come_with_the_claim(api: PostgREST, sidecar: Any, database: Database) -> None:
    database.execute(
        "insert into sms.templates (purpose, sign_name, template_code) values"
        " ('bind_phone', '阿里云短信测试', 'SMS_154950909') on conflict do nothing"
    )
    enqueue(api, purpose="bind_phone")
    (message,) = claim(sidecar)
    assert (message["sign_name"], message["template_code"]) == ("阿里云短信测试", "SMS_154950909")


def test_accepted_erases_the_plain_code(api: PostgREST, sidecar: Any, database: Database) -> None:
    request_id = enqueue(api)
    (message,) = claim(sidecar)
    status = finish(
        sidecar,
        message["delivery_id"],
        "accepted",
        provider="aliyun",
        provider_code="OK",
        biz_id="900619746936498^0",
        provider_request_id="F655A8D5",
        latency_ms=12,
    )
    assert status == "sent"
    row = database.one("select to_jsonb(o) from sms.outbox as o where o.code_id = %s", [request_id])
    assert (row["status"], row["code"], row["biz_id"]) == ("sent", None, "900619746936498^0")
    ledger = database.one("select to_jsonb(d) from sms.deliveries as d where d.id = %s", [message["delivery_id"]])
    assert ledger["outcome"] == "accepted" and ledger["provider_request_id"] == "F655A8D5"
    assert ledger["latency_ms"] == 12 and ledger["finished_at"] is not None


def test_a_plain_code_cannot_outlive_delivery(database: Database, api: PostgREST) -> None:
    request_id = enqueue(api)
    with pytest.raises(psycopg.errors.CheckViolation):
        database.execute("update sms.outbox set status = 'sent' where code_id = %s", [request_id])


def test_rejected_fails_at_once(api: PostgREST, sidecar: Any, database: Database) -> None:
    enqueue(api)
    (message,) = claim(sidecar)
    assert finish(sidecar, message["delivery_id"], "rejected", provider_code="isv.MOBILE_NUMBER_ILLEGAL") == "failed"
    assert database.one("select code from sms.outbox where id = %s", [message["message_id"]]) is None


def test_retry_requeues_with_a_delay_until_the_limit(api: PostgREST, sidecar: Any, database: Database) -> None:
    enqueue(api)
    (message,) = claim(sidecar)
    assert (
        finish(
            sidecar,
            message["delivery_id"],
            "retry",
            provider_code="isp.SYSTEM_ERROR",
            retry_in_seconds=30,
            max_attempts=2,
        )
        == "queued"
    )
    assert claim(sidecar) == []  # not due yet
    database.execute("update sms.outbox set next_attempt_at = now() where id = %s", [message["message_id"]])
    (again,) = claim(sidecar)
    assert again["attempt"] == 2 and again["code"] == message["code"]
    assert finish(sidecar, again["delivery_id"], "retry", retry_in_seconds=0, max_attempts=2) == "failed"


def test_an_expired_lease_is_reclaimed_and_flagged(api: PostgREST, sidecar: Any, database: Database) -> None:
    enqueue(api)
    (first,) = claim(sidecar, "crashed", lease=1)
    database.execute(
        "update sms.outbox set lease_until = now() - interval '1 second' where id = %s", [first["message_id"]]
    )
    (second,) = claim(sidecar, "w2")
    assert second["message_id"] == first["message_id"] and second["needs_reconcile"] is True
    outcome = database.one("select outcome from sms.deliveries where id = %s", [first["delivery_id"]])
    assert outcome == "ambiguous"


def test_release_gives_claims_back_uncounted(api: PostgREST, sidecar: Any, database: Database) -> None:
    enqueue(api)
    enqueue(api)
    assert len(claim(sidecar, "stopping")) == 2
    assert sidecar.execute("select sms.release_messages('stopping') as n").fetchone()["n"] == 2
    again = claim(sidecar, "w2")
    assert [m["attempt"] for m in again] == [1, 1]


def test_expired_codes_are_not_sent(api: PostgREST, sidecar: Any, database: Database) -> None:
    request_id = enqueue(api)
    database.execute("update sms.outbox set expires_at = now() - interval '1 second' where code_id = %s", [request_id])
    assert claim(sidecar) == []
    row = database.one("select to_jsonb(o) from sms.outbox as o where o.code_id = %s", [request_id])
    assert (row["status"], row["code"], row["provider_code"]) == ("failed", None, "EXPIRED")


def test_concurrent_claimers_never_share_a_message(api: PostgREST, database: Database) -> None:
    for _ in range(60):
        enqueue(api)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        with psycopg.connect(database.url, autocommit=True) as conn:
            conn.execute("set role sms_sidecar")
            while rows := conn.execute("select message_id from sms.claim_messages(%s, 3, 60)", [name]).fetchall():
                with lock:
                    claimed.extend(str(r[0]) for r in rows)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 60 and len(set(claimed)) == 60


def test_enqueue_notifies_listeners_on_commit(api: PostgREST, database: Database) -> None:
    with psycopg.connect(database.url, autocommit=True) as listener:
        listener.execute("set role sms_sidecar")
        listener.execute("listen sms_outbox")
        enqueue(api)
        ready, _, _ = select.select([listener.fileno()], [], [], 5)
        assert ready, "no notification within 5 s"
        notices = list(listener.notifies(timeout=1, stop_after=1))
        assert notices and notices[0].channel == "sms_outbox"


def test_finish_rejects_unknown_outcomes_and_ids(sidecar: Any) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        finish(sidecar, 1, "maybe")
    with pytest.raises(psycopg.errors.NoDataFound):
        finish(sidecar, 2**62, "accepted")


def test_purge_keeps_recent_rows_and_removes_old_ones(api: PostgREST, database: Database) -> None:
    old, recent = enqueue(api), enqueue(api)
    database.execute(
        "update sms.outbox set status = 'failed', code = null, created_at = now() - interval '40 days'"
        " where code_id = %s",
        [old],
    )
    database.execute("update sms.codes set expires_at = now() - interval '40 days' where id = %s", [old])
    result = database.one("select sms.purge()")
    assert result["messages"] >= 1 and result["codes"] >= 1
    assert database.one("select count(*) from sms.codes where id in (%s, %s)", [old, recent]) == 1
    assert database.one("select count(*) from sms.outbox where code_id = %s", [recent]) == 1
