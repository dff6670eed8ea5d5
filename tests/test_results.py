"""Delivery results recorded several to a statement (sidecar/store.py Store.finish, sms.finish_deliveries)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from sidecar.db import create_pool
from sidecar.outcomes import Outcome, SendResult
from sidecar.store import Finished, Store
from tests.support.builders import fresh_phone, without_send_limits
from tests.support.database import Database, drain_queue
from tests.support.postgrest import SERVICE, PostgREST
from tests.support.servers import sidecar_url


def claimed(api: PostgREST, database: Database, count: int) -> list[int]:
    """`count` queued codes, claimed as a worker would: their open delivery ids."""
    drain_queue(database)
    for _ in range(count):
        assert api.rpc("request_phone_code", {"phone": fresh_phone()}, SERVICE).status == 200
    rows = database.execute("select delivery_id from sms.claim_messages('results-test', %s, 60)", [count])
    return [r[0] for r in rows]


def accepted(delivery_id: int) -> Finished:
    return Finished(delivery_id, SendResult(Outcome.ACCEPTED, "OK", biz_id=f"biz-{delivery_id}"), "aliyun", 7, 0, 5)


async def record(database: Database, items: list[Finished]) -> tuple[list[str | BaseException], int]:
    """Finish every item at once through one store: the statuses, and how many statements it took."""
    pool = create_pool(sidecar_url(database), max_size=4)
    await pool.open(wait=True)
    statements = 0
    try:
        store = Store(pool, sidecar_url(database), "results-test")
        original = pool.connection

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal statements
            statements += 1
            return original(*args, **kwargs)

        pool.connection = counting  # type: ignore[method-assign]
        results = await asyncio.gather(*(store.finish(item, 10) for item in items), return_exceptions=True)
    finally:
        await pool.close()
    return list(results), statements


@pytest.fixture(autouse=True)
def _unlimited(settings: Any) -> None:
    without_send_limits(settings)


def test_results_finishing_together_share_statements_and_each_gets_its_own(api: PostgREST, database: Database) -> None:
    ids = claimed(api, database, 40)
    statuses, statements = asyncio.run(record(database, [accepted(i) for i in ids]))
    assert statuses == ["sent"] * 40
    assert statements < 40 / 4, statements  # 40 results, a handful of statements
    rows = database.execute(
        "select o.status, o.code is null, d.outcome, d.biz_id from sms.deliveries as d"
        " join sms.outbox as o on o.id = d.message_id where d.id = any(%s) order by d.id", [ids],
    )  # fmt: skip
    assert rows == [("sent", True, "accepted", f"biz-{i}") for i in sorted(ids)]


def test_one_bad_result_does_not_fail_the_others(api: PostgREST, database: Database) -> None:
    ids = claimed(api, database, 6)
    items = [accepted(i) for i in ids]
    items.insert(3, accepted(-1))  # no such delivery attempt
    statuses, _ = asyncio.run(record(database, items))
    assert isinstance(statuses[3], psycopg.Error) and "no delivery attempt" in str(statuses[3])
    assert statuses[:3] + statuses[4:] == ["sent"] * 6
