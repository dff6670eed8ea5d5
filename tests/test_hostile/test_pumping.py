"""Hostile input: sMS pumping through the SQL API."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.support.builders import fresh_phone
from tests.support.database import Database
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import (
    make_metadata,
    make_user,
    otp_login,
)
from tests.support.hostile import NEW, OLD, InProcess, ask, digits, limits_hit
from tests.support.postgrest import SERVICE, Caller, PostgREST, user

# --------------------------------------------------------------------------------------------------
# SMS pumping through the SQL API


def unique_ipv6() -> str:
    return f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::{uuid.uuid4().hex[:4]}"


def test_one_user_cannot_pump_many_numbers(api: PostgREST, database: Database, settings: Any) -> None:
    settings(hourly_limit_per_user=5, hourly_limit_per_ip=None)
    attacker = user()
    answers = []
    for i in range(15):
        # New numbers, rotating purposes and source addresses: none of it resets the per-user count.
        pumped = Caller(attacker.role, attacker.sub, {"x-real-ip": unique_ipv6()})
        answers.append(ask(api, fresh_phone(), pumped, purpose=["default", "bind_phone", f"p{i}"][i % 3]))
    assert [a.status for a in answers] == [200] * 5 + [429] * 10
    assert all(limits_hit(a) == ["hourly_limit_per_user"] for a in answers[5:])
    assert database.one("select count(*) from sms.outbox where user_id = %s", [attacker.sub]) == 5


def test_many_users_from_one_address_cannot_pump(api: PostgREST, database: Database, settings: Any) -> None:
    settings(hourly_limit_per_ip=4, hourly_limit_per_user=None)
    ip = unique_ipv6()
    expanded = ":".join(f"{int(g or '0', 16):04X}" for g in ip.replace("::", ":0:0:0:").split(":"))
    callers = [
        user(x_real_ip=ip),
        user(x_forwarded_for=f"10.0.0.1, {ip}"),  # the client's own entries are further left
        user(x_forwarded_for=f"{unique_ipv6()},{ip}"),
        user(x_real_ip=ip, x_forwarded_for=unique_ipv6()),  # X-Real-IP wins
        user(x_forwarded_for=f"  {ip}  "),
        user(x_real_ip=expanded),  # the same address written differently
        user(x_real_ip=ip.upper()),
        user(x_forwarded_for=f"198.51.100.7, {ip}"),
        user(x_real_ip=ip),
        user(x_real_ip=ip),
    ]
    answers = [ask(api, fresh_phone(), caller) for caller in callers]
    assert [a.status for a in answers] == [200] * 4 + [429] * 6, [a.body for a in answers]
    assert all(limits_hit(a) == ["hourly_limit_per_ip"] for a in answers[4:])
    assert database.one("select count(*) from sms.outbox where ip_key = sms._ip_key(%s::inet)", [ip]) == 4


def test_one_number_from_many_users_and_addresses(api: PostgREST, database: Database, settings: Any) -> None:
    # However many accounts and addresses, callers who do not own a number share a small budget for it.
    settings(resend_cooldown_seconds=60, hourly_limit_per_phone=5, daily_limit_per_phone=10,
             others_hourly_limit_per_phone=2, others_daily_limit_per_phone=3, hourly_limit_per_user=None,
             hourly_limit_per_ip=None)  # fmt: skip
    phone = fresh_phone()
    forms = ["+" + phone, phone, "00" + phone, phone[2:], f"+86 {phone[2:5]}-{phone[5:9]}-{phone[9:]}"]
    expected = {0: ([200] * 2 + [429] * 3, "others_hourly_limit_per_phone"),
                1: ([200] + [429] * 4, "others_daily_limit_per_phone"),
                2: ([429] * 5, "others_daily_limit_per_phone")}  # fmt: skip
    for hour, (statuses, limit) in expected.items():
        answers = [ask(api, form, user(x_real_ip=unique_ipv6())) for form in forms]
        assert [a.status for a in answers] == statuses, (hour, [a.body for a in answers])
        assert all(limit in limits_hit(a) for a in answers if a.status == 429)
        database.execute("update sms.outbox set created_at = created_at - interval '61 min' where phone = %s", [phone])
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 3
    # The owner's room is untouched: the backend, acting for the owner, still gets through.
    assert ask(api, phone, SERVICE).status == 200


def test_the_hook_and_the_api_share_the_per_number_limits(
    api: PostgREST, hook: InProcess, fake: FakeAliyun, database: Database, settings: Any
) -> None:
    settings(resend_cooldown_seconds=60, hourly_limit_per_phone=2)
    phone, address = fresh_phone(), unique_ipv6()
    assert ask(api, phone, user()).status == 200
    # Another caller's request does not start a cooldown against the owner's login ...
    first = hook.gotrue(otp_login(NEW, phone=phone, metadata=make_metadata(ip_address=address)))
    assert first.outcome == "success" and len(fake.sends) == 1
    # ... but every send counts against the number's hourly limit, whoever asked.
    assert "hourly_limit_per_phone" in limits_hit(ask(api, phone, SERVICE))
    database.execute("update sms.outbox set created_at = created_at - interval '61 s' where phone = %s", [phone])
    second = hook.gotrue(otp_login(NEW, phone=phone, metadata=make_metadata(ip_address=address)))
    assert second.status == 429 and len(fake.sends) == 1
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 2


# --------------------------------------------------------------------------------------------------
# Premium-rate pumping through the hook

PREMIUM = [
    "881612345678",  # Iridium satellite
    "88213123456",  # international networks
    "5351234567",  # Cuba
    "252612345678",  # Somalia
    "37120000000",  # Latvia
    "23276123456",  # Sierra Leone
    "+8816 1234 5678",
    "00881612345678",
    "8608816123456",  # 86 in front of something that is not a mainland mobile
    "86 881612345678",
    "8529123456",  # Hong Kong, not allowed by default
]


@pytest.mark.parametrize("number", PREMIUM)
@pytest.mark.parametrize("version", [NEW, OLD], ids=["metadata", "no-metadata"])
def test_numbers_outside_the_allowed_countries_are_never_texted(
    hook: InProcess, fake: FakeAliyun, database: Database, number: str, version: tuple[int, int, int]
) -> None:
    payloads = [
        otp_login(version, phone=number),
        # The number to text is sms.phone; a harmless mainland user.phone must not launder it.
        otp_login(version, phone=number, user=make_user(phone=fresh_phone())),
    ]
    for payload in payloads:
        result = hook.gotrue(payload)
        assert result.outcome != "success"
        assert result.attempts[-1].status == (200 if version == NEW else 400)
        if version == NEW:
            assert result.status == 400, result.outcome
    assert fake.requests_seen == 0
    assert database.one("select count(*) from sms.outbox where phone = %s", [digits(number).lstrip("0")]) == 0


def test_only_listed_countries_are_texted(hook: InProcess, fake: FakeAliyun, settings: Any) -> None:
    settings(allowed_country_codes=["86", "852"])
    for number in PREMIUM[:6]:
        assert hook.gotrue(otp_login(NEW, phone=number)).status == 400
    hong_kong = f"8529{uuid.uuid4().int % 10**7:07d}"
    assert hook.gotrue(otp_login(NEW, phone=hong_kong)).outcome == "success"
    assert [s.phone_numbers for s in fake.sends] == [hong_kong]


def test_north_american_numbers_from_gotrue_are_not_read_as_mainland(
    hook: InProcess, fake: FakeAliyun, database: Database, settings: Any
) -> None:
    # GoTrue hands over E.164 digits without the "+": 1 900 555 xxxx is a North American premium-rate
    # number, 1 415 555 xxxx a San Francisco one. Neither is a mainland number that lost its 86.
    suffix = f"{uuid.uuid4().int % 10**4:04d}"
    premium, us = "1900555" + suffix, "1415555" + suffix
    result = hook.gotrue(otp_login(NEW, phone=premium))
    assert result.outcome != "success" and result.status == 400, result.outcome
    assert fake.requests_seen == 0
    settings(allowed_country_codes=["86", "1"])
    assert hook.gotrue(otp_login(NEW, phone=us)).outcome == "success"
    (sent,) = fake.wait_for_sends(1)
    assert (sent.phone_numbers, sent.template_code) == (us, "SMS_200000001")  # the international template
    assert database.one("select phone from sms.outbox where phone like %s", ["%" + us]) == us
