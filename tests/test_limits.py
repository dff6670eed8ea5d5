"""Sending limits from sms.settings, answered as HTTP 429 with the seconds to wait."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.support.builders import fresh_phone
from tests.support.database import Database
from tests.support.postgrest import SERVICE, Caller, PostgREST, Response, user


def ask(api: PostgREST, phone: str, caller: Caller) -> Response:
    return api.rpc("request_phone_code", {"phone": phone}, caller)


def assert_limited(response: Response, limit: str, low: int, high: int) -> None:
    assert response.status == 429, response.body
    assert response.body["code"] == "over_sms_send_rate_limit"
    details = json.loads(response.body["details"])
    assert limit in details["limits"]
    assert low <= details["retry_after"] <= high
    assert response.headers["Retry-After"] == str(details["retry_after"])
    assert str(details["retry_after"]) in response.body["message"]


def test_resend_cooldown_per_phone_and_requester(api: PostgREST, phone: str) -> None:
    alice = user()
    first = ask(api, phone, alice)
    assert first.status == 200 and first.body["retry_after"] == 60
    assert_limited(ask(api, phone, alice), "resend_cooldown", 58, 60)
    # Other numbers are unaffected, and so is anyone else asking for this one.
    assert ask(api, fresh_phone(), alice).status == 200
    assert ask(api, phone, user()).status == 200


def test_cooldown_ends(api: PostgREST, database: Database, phone: str) -> None:
    alice = user()
    assert ask(api, phone, alice).status == 200
    database.execute("update sms.outbox set created_at = created_at - interval '61 seconds' where phone = %s", [phone])
    assert ask(api, phone, alice).status == 200


def age_oldest_send(database: Database, phone: str, by: str) -> None:
    database.execute(
        "update sms.outbox set created_at = created_at - %s::interval where id ="
        " (select id from sms.outbox where phone = %s order by created_at limit 1)",
        [by, phone],
    )


def test_daily_limit_per_phone(api: PostgREST, database: Database, settings: Any, phone: str) -> None:
    settings(resend_cooldown_seconds=None, daily_limit_per_phone=3)
    for _ in range(3):
        assert ask(api, phone, SERVICE).status == 200
    # Age the oldest send: the wait is until it leaves the 24-hour window.
    age_oldest_send(database, phone, "23 hours")
    assert_limited(ask(api, phone, SERVICE), "daily_limit_per_phone", 3595, 3600)


def test_hourly_limit_per_phone_defaults_to_aliyuns_five(
    api: PostgREST, database: Database, settings: Any, phone: str
) -> None:
    settings(resend_cooldown_seconds=None)  # the hourly limit alone, at its default
    assert database.one("select hourly_limit_per_phone from sms.settings") == 5
    for _ in range(5):
        assert ask(api, phone, SERVICE).status == 200
    # The sixth in the hour would meet Aliyun's isv.BUSINESS_LIMIT_CONTROL: refused here, with the
    # wait until the oldest of the five leaves the rolling hour.
    age_oldest_send(database, phone, "50 minutes")
    assert_limited(ask(api, phone, SERVICE), "hourly_limit_per_phone", 595, 600)
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 5
    settings(hourly_limit_per_phone=None)
    assert ask(api, phone, SERVICE).status == 200


def test_hourly_limit_per_user(api: PostgREST, settings: Any) -> None:
    settings(hourly_limit_per_user=2)
    alice = user()
    assert ask(api, fresh_phone(), alice).status == 200
    assert ask(api, fresh_phone(), alice).status == 200
    assert_limited(ask(api, fresh_phone(), alice), "hourly_limit_per_user", 3590, 3600)
    assert ask(api, fresh_phone(), user()).status == 200


def test_hourly_limit_per_ip(api: PostgREST, settings: Any) -> None:
    settings(hourly_limit_per_ip=2)
    for _ in range(2):
        assert ask(api, fresh_phone(), user(x_real_ip="203.0.113.7")).status == 200
    assert_limited(ask(api, fresh_phone(), user(x_real_ip="203.0.113.7")), "hourly_limit_per_ip", 3590, 3600)
    # Behind a proxy that only appends to X-Forwarded-For, the right-most entry is the client;
    # whatever the client put further left cannot dodge the limit.
    forged = user(x_forwarded_for="198.51.100.1, 203.0.113.7")
    assert_limited(ask(api, fresh_phone(), forged), "hourly_limit_per_ip", 3590, 3600)
    assert ask(api, fresh_phone(), user(x_real_ip="203.0.113.8")).status == 200


def test_service_role_is_not_limited_by_its_own_address(api: PostgREST, settings: Any) -> None:
    settings(hourly_limit_per_ip=1)
    backend = Caller("service_role", headers={"x-real-ip": "192.0.2.10"})
    for _ in range(3):
        assert ask(api, fresh_phone(), backend).status == 200


def test_service_role_still_has_the_phone_limits(api: PostgREST, phone: str) -> None:
    assert ask(api, phone, SERVICE).status == 200
    assert_limited(ask(api, phone, SERVICE), "resend_cooldown", 58, 60)


def test_null_disables_a_limit(api: PostgREST, settings: Any, phone: str) -> None:
    settings(resend_cooldown_seconds=None, daily_limit_per_phone=None, hourly_limit_per_phone=None)
    for _ in range(12):
        assert ask(api, phone, SERVICE).status == 200
    settings(others_hourly_limit_per_phone=None, others_daily_limit_per_phone=None)
    for _ in range(12):
        assert ask(api, phone, user()).status == 200


def test_limited_requests_leave_nothing_behind(api: PostgREST, database: Database, phone: str) -> None:
    alice = user()
    assert ask(api, phone, alice).status == 200
    assert ask(api, phone, alice).status == 429
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 1
    assert database.one("select count(*) from sms.codes where phone = %s", [phone]) == 1


def test_concurrent_requests_cannot_race_past_the_cooldown(api: PostgREST, database: Database, phone: str) -> None:
    alice = user()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: ask(api, phone, alice).status, range(16)))
    assert sorted(statuses) == [200] + [429] * 15
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 1


def test_concurrent_requests_cannot_race_past_the_user_limit(api: PostgREST, settings: Any) -> None:
    settings(hourly_limit_per_user=3)
    alice = user()
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: ask(api, fresh_phone(), alice).status, range(12)))
    assert sorted(statuses) == [200] * 3 + [429] * 9
