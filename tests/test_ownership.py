"""Who owns which code and which sending budget (README, "Security model").

A code belongs to whoever asked for it (a user, the backend, the gRPC API, an anonymous caller at one
address); nobody else's request supersedes it and nobody else's guesses count against it. A phone's
sends are counted per requester (cooldown) and per phone (hourly, daily); callers who do not own
the number share a small part of that, so they can neither lock the owner out nor bomb the number.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from tests.support.builders import fresh_phone
from tests.support.codes import wrong
from tests.support.database import Database, call_hook
from tests.support.gotrue import go_json, make_metadata, otp_login
from tests.support.postgrest import ANON, SERVICE, Caller, PostgREST, Response, user


def ask(api: PostgREST, phone: str, caller: Caller) -> Response:
    return api.rpc("request_phone_code", {"phone": phone}, caller)


def check(api: PostgREST, phone: str, code: str, caller: Caller) -> Any:
    response = api.rpc("verify_phone_code", {"phone": phone, "code": code}, caller)
    assert response.status == 200, response.body
    return response.body


def code_of(database: Database, response: Response) -> str:
    assert response.status == 200, response.body
    code: str = database.one("select code from sms.outbox where code_id = %s", [response.body["request_id"]])
    return code


def limits_hit(response: Response) -> list[str]:
    assert response.status == 429, response.body
    return list(json.loads(response.body["details"])["limits"])


def owner_of(database: Database, phone: str) -> Caller:
    """A signed-in user whose Supabase Auth phone is this number."""
    uid = str(uuid.uuid4())
    database.execute("insert into auth.users (id, phone) values (%s, %s)", [uid, phone])
    return user(uid)


def test_another_users_request_neither_supersedes_nor_cools_down_the_owners_code(
    api: PostgREST, database: Database
) -> None:
    phone = fresh_phone()
    owner, stranger = owner_of(database, phone), user()
    assert ask(api, phone, stranger).status == 200  # no cooldown against the owner follows from this
    mine = code_of(database, ask(api, phone, owner))
    assert ask(api, phone, user()).status == 200  # another stranger: the owner's code stays valid
    assert check(api, phone, mine, owner) == {"valid": True}


def test_nobody_elses_guesses_count_against_a_code(api: PostgREST, database: Database, settings: Any) -> None:
    settings(max_attempts=3)
    phone = fresh_phone()
    owner = owner_of(database, phone)
    mine = code_of(database, ask(api, phone, owner))
    for caller in (user(), user(), user(), SERVICE, SERVICE, SERVICE):
        assert check(api, phone, wrong(mine), caller)["reason"] == "not_found"
        assert check(api, phone, mine, caller)["reason"] == "not_found"  # and the right code is not theirs
    assert database.one("select attempts from sms.codes where phone = %s", [phone]) == 0
    assert check(api, phone, mine, owner) == {"valid": True}


def test_anonymous_callers_cannot_guess_away_a_code_the_backend_requested(
    api: PostgREST, database: Database, settings: Any
) -> None:
    settings(allow_anon=True, max_attempts=3)
    phone = fresh_phone()
    backend = code_of(database, ask(api, phone, SERVICE))
    for _ in range(5):
        assert check(api, phone, wrong(backend), ANON)["reason"] == "not_found"
    assert check(api, phone, backend, SERVICE) == {"valid": True}
    # Anonymous callers own codes by address: another address can neither use nor kill them.
    here, there = (
        Caller("anon", headers={"x-real-ip": unused_ipv4(database)}),
        Caller("anon", headers={"x-real-ip": unused_ipv4(database)}),
    )
    theirs = code_of(database, ask(api, phone, here))
    for _ in range(5):
        assert check(api, phone, theirs, there)["reason"] == "not_found"
    assert check(api, phone, theirs, here) == {"valid": True}


def test_others_cannot_use_up_the_owners_room_for_auth_logins(
    api: PostgREST, database: Database, settings: Any
) -> None:
    # Aliyun's own default: 5 per number and sign per hour. Strangers may take 2 of them, never more.
    settings(resend_cooldown_seconds=None, hourly_limit_per_phone=5, others_hourly_limit_per_phone=2,
             hourly_limit_per_user=None, hourly_limit_per_ip=None)  # fmt: skip
    phone = fresh_phone()
    strangers = [ask(api, phone, user(x_real_ip=f"203.0.113.{n}")) for n in range(1, 11)]
    assert [a.status for a in strangers] == [200] * 2 + [429] * 8
    assert all("others_hourly_limit_per_phone" in limits_hit(a) for a in strangers[2:])
    # The owner signs in through Supabase Auth three times within the hour: all go out.
    logins = [call_hook(database, go_json(otp_login((2, 196, 0), phone=phone))) for _ in range(3)]
    assert logins == [{}] * 3
    assert database.one("select count(*) from sms.outbox where phone = %s and by_owner", [phone]) == 3
    # The number's own limit still holds for everyone: no sixth SMS this hour.
    assert call_hook(database, go_json(otp_login((2, 196, 0), phone=phone)))["error"]["http_code"] == 429


def test_a_user_requesting_their_own_auth_phone_is_the_owner(api: PostgREST, database: Database, settings: Any) -> None:
    settings(resend_cooldown_seconds=None, hourly_limit_per_phone=5, others_hourly_limit_per_phone=0)
    phone = fresh_phone()
    assert "others_hourly_limit_per_phone" in limits_hit(ask(api, phone, user()))
    assert ask(api, phone, owner_of(database, phone)).status == 200


@pytest.mark.parametrize("limit", ["cooldown", "user"])
@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
def test_limits_hold_at_every_isolation_level(database: Database, settings: Any, isolation: str, limit: str) -> None:
    # 30 requests of one user at once, each in a transaction whose snapshot predates every commit:
    # to one phone (the cooldown allows 1), or to 30 phones (the per-user limit allows 5).
    settings(resend_cooldown_seconds=60, hourly_limit_per_user=5 if limit == "user" else None, hourly_limit_per_ip=None)
    alice, phone = str(uuid.uuid4()), fresh_phone()
    allowed = 1 if limit == "cooldown" else 5
    start = threading.Barrier(30)

    def request(_: int) -> str:
        with psycopg.connect(database.url) as conn:
            conn.execute(f"set transaction isolation level {isolation}")
            conn.execute("set local role authenticated")
            claims = json.dumps({"role": "authenticated", "sub": alice})
            conn.execute("select set_config('request.jwt.claims', %s, true)", [claims])
            conn.execute("select 1").fetchone()  # the snapshot, under REPEATABLE READ and SERIALIZABLE
            start.wait()
            try:
                conn.execute("select public.request_phone_code(%s)", [phone if limit == "cooldown" else fresh_phone()])
                conn.commit()
            except psycopg.Error as exc:
                conn.rollback()
                if exc.sqlstate == "PGRST":
                    return str(json.loads(exc.diag.message_primary or "{}")["code"])
                return f"sqlstate {exc.sqlstate}"
            return "ok"

    with ThreadPoolExecutor(30) as pool:
        outcomes = list(pool.map(request, range(30)))
    sent = database.one("select count(*) from sms.outbox where user_id = %s", [alice])
    assert 1 <= sent <= allowed and outcomes.count("ok") == sent, outcomes
    # Whatever was refused was refused as over a limit, or as a conflict worth retrying.
    assert set(outcomes) - {"ok"} <= {"over_sms_send_rate_limit", "concurrent_request", "sqlstate 40001"}, outcomes
    if isolation == "read committed":  # nothing to retry there: the limit is reached exactly
        assert sent == allowed and set(outcomes) == {"ok", "over_sms_send_rate_limit"}, outcomes


def unused_ipv4(database: Database) -> str:
    """A client address no earlier request of this test session came from (the limits count per hour)."""
    while True:
        address = f"100.{random.randrange(64, 128)}.{random.randrange(256)}.{random.randrange(1, 255)}"
        if not database.one("select exists (select from sms.outbox where ip_key = %s)", [address]):
            return address


@pytest.mark.parametrize(
    "forms",
    [
        ["{v4}", "{v4}/24", "{v4}/32", "::ffff:{v4}"],
        ["2001:db8:{g}:1::1", "2001:db8:{g}:1::2", "2001:DB8:{g}:1:0:0:0:3", "2001:db8:{g}:1::4/128"],
    ],
    ids=["ipv4", "ipv6-per-64"],
)
def test_one_host_is_counted_once_however_its_address_is_written(
    api: PostgREST, database: Database, settings: Any, forms: list[str]
) -> None:
    settings(hourly_limit_per_ip=3, hourly_limit_per_user=None)
    v4, group = unused_ipv4(database), uuid.uuid4().hex[:4]  # tests/test_hostile.py's IPv6 use other /64s
    answers = [ask(api, fresh_phone(), user(x_real_ip=form.format(v4=v4, g=group))) for form in forms]
    assert [a.status for a in answers] == [200, 200, 200, 429], [a.body for a in answers]
    assert limits_hit(answers[-1]) == ["hourly_limit_per_ip"]


@pytest.mark.parametrize("header", ["not-an-address", "999.1.1.1", "198.51.100.1, garbage", ""])
def test_an_address_header_that_is_no_address_does_not_switch_the_limit_off(
    api: PostgREST, database: Database, settings: Any, header: str
) -> None:
    settings(hourly_limit_per_ip=2, hourly_limit_per_user=None)
    database.execute("delete from sms.outbox where ip_key = 'invalid'")
    headers = {"x_forwarded_for": header} if header else {"x_real_ip": "   "}
    answers = [ask(api, fresh_phone(), user(**headers)) for _ in range(3)]
    if not header:  # a blank X-Real-IP is no header at all: nothing to count
        assert [a.status for a in answers] == [200] * 3
        return
    assert [a.status for a in answers] == [200, 200, 429]
    assert limits_hit(answers[-1]) == ["hourly_limit_per_ip"]


def anonymous_user(**headers: str) -> Caller:
    return Caller("authenticated", str(uuid.uuid4()), {k.replace("_", "-"): v for k, v in headers.items()}, True)


def test_anonymous_sign_ins_are_counted_per_address_not_per_fresh_user(
    api: PostgREST, database: Database, settings: Any
) -> None:
    settings(hourly_limit_per_ip=3, hourly_limit_per_user=10)
    address = unused_ipv4(database)
    answers = [ask(api, fresh_phone(), anonymous_user(x_real_ip=address)) for _ in range(5)]
    assert [a.status for a in answers] == [200] * 3 + [429] * 2
    assert limits_hit(answers[-1]) == ["hourly_limit_per_ip"]
    # Without an address they all share one bucket instead of escaping the limit.
    database.execute("delete from sms.outbox where ip_key = 'unknown'")
    answers = [ask(api, fresh_phone(), anonymous_user()) for _ in range(4)]
    assert [a.status for a in answers] == [200] * 3 + [429]
    # Their codes are still theirs alone.
    phone, here = fresh_phone(), unused_ipv4(database)
    me = anonymous_user(x_real_ip=here)
    mine = code_of(database, ask(api, phone, me))
    assert check(api, phone, mine, anonymous_user(x_real_ip=here))["reason"] == "not_found"
    assert check(api, phone, mine, me) == {"valid": True}


def test_anonymous_sign_ins_can_be_refused(api: PostgREST, settings: Any) -> None:
    settings(allow_anonymous_users=False)
    refused = ask(api, fresh_phone(), anonymous_user(x_real_ip="198.51.100.7"))
    assert refused.status == 403 and refused.body["code"] == "anonymous_user_not_allowed"
    assert ask(api, fresh_phone(), user(x_real_ip="198.51.100.7")).status == 200


def test_the_hook_counts_its_address_per_host(database: Database, settings: Any) -> None:
    settings(hourly_limit_per_ip=1)
    v4 = unused_ipv4(database)
    first = otp_login((2, 196, 0), phone=fresh_phone(), metadata=make_metadata(ip_address=v4))
    second = otp_login((2, 196, 0), phone=fresh_phone(), metadata=make_metadata(ip_address=f"::ffff:{v4}"))
    assert call_hook(database, go_json(first)) == {}
    assert call_hook(database, go_json(second))["error"]["http_code"] == 429
