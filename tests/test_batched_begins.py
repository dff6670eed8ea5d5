"""Hook events leased several to a statement (sidecar/batches.py, sms.hook_begin_many)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from sidecar.batches import Batcher
from sidecar.db import create_pool
from tests.support.builders import fresh_phone, without_send_limits
from tests.support.database import Database
from tests.support.servers import sidecar_url


def event(phone: str, ip: str = "198.51.100.20") -> dict[str, Any]:
    return {
        "metadata": {"uuid": str(uuid.uuid4()), "ip_address": ip},
        "user": {"phone": phone.lstrip("+")},
        "sms": {"otp": "123456", "phone": phone.lstrip("+"), "sms_type": "sms"},
    }


async def begin_together(database: Database, events: list[Any]) -> tuple[list[Any], int]:
    """Begin every event at once through one batcher, as the hook does: answers, and statements taken."""
    pool = create_pool(sidecar_url(database), max_size=4)
    await pool.open(wait=True)
    statements = 0
    try:
        begins = Batcher(pool, "select sms.hook_begin_many(%(items)s, %(worker)s, %(lease)s)", max_batch=16,
                         timeout=5.0, params={"worker": "batch-test", "lease": 10})  # fmt: skip
        original = pool.connection

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal statements
            statements += 1
            return original(*args, **kwargs)

        pool.connection = counting  # type: ignore[method-assign]
        items = [{"event": e, "body_sha256": f"sha-{i}"} for i, e in enumerate(events)]
        answers = await asyncio.gather(*(begins.submit(item, 10) for item in items), return_exceptions=True)
    finally:
        await pool.close()
    return list(answers), statements


def test_events_arriving_together_share_statements_and_each_gets_its_own_lease(
    database: Database, settings: Any
) -> None:
    without_send_limits(settings)
    phones = [fresh_phone() for _ in range(40)]
    answers, statements = asyncio.run(begin_together(database, [event(p) for p in phones]))
    assert [a["action"] for a in answers] == ["send"] * 40
    assert [a["phone"] for a in answers] == phones
    assert statements <= 40 / 4, statements
    rows = database.execute(
        "select o.phone, o.status, d.worker from sms.outbox as o join sms.deliveries as d on d.message_id = o.id"
        " where d.id = any(%s) order by o.phone", [[a["delivery_id"] for a in answers]],
    )  # fmt: skip
    assert rows == [(p, "sending", "batch-test") for p in sorted(phones)]


def test_a_refused_event_undoes_only_its_own_work(database: Database, settings: Any) -> None:
    """A rate-limited event in the middle of a batch is refused; the others are leased and the limit
    itself sees the earlier events of the same statement."""
    without_send_limits(settings)
    settings(resend_cooldown_seconds=60)
    phones = [fresh_phone() for _ in range(5)]
    repeated = phones[1]
    events = [event(p) for p in phones]
    events.insert(3, event(repeated))  # the same number again, within the cooldown
    answers, _ = asyncio.run(begin_together(database, events))
    assert [a["action"] for a in answers] == ["send", "send", "send", "refused", "send", "send"]
    refused = answers[3]
    assert refused["meta"]["status"] == 429 and refused["error"]["code"] == "over_sms_send_rate_limit"
    assert int(refused["meta"]["headers"]["Retry-After"]) > 0
    assert database.one("select count(*) from sms.outbox where phone = %s", [repeated]) == 1


def test_an_event_postgres_cannot_hold_fails_alone(database: Database, settings: Any) -> None:
    """A value jsonb refuses (a NUL) fails the shared statement: each event is then begun alone, and
    only the bad one gets the error."""
    without_send_limits(settings)
    phones = [fresh_phone() for _ in range(4)]
    events: list[Any] = [event(p) for p in phones]
    events.insert(2, {"sms": {"otp": "123456", "phone": "86138\u00000000000"}})
    answers, _ = asyncio.run(begin_together(database, events))
    assert isinstance(answers[2], psycopg.DataError), answers[2]
    good = answers[:2] + answers[3:]
    assert [a["action"] for a in good] == ["send"] * 4
    assert sorted(a["phone"] for a in good) == sorted(phones)


def test_the_sidecar_may_only_begin_in_batches(database: Database) -> None:
    with psycopg.connect(sidecar_url(database)) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select sms._begin_hook_message('{}'::jsonb, 'x', 'auth_hook', 'w')")
