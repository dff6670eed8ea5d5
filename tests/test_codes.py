"""The verification-code rules of public.request_phone_code / verify_phone_code / phone_code_status."""

from __future__ import annotations

import re
import uuid
from collections import Counter

import pytest
from psycopg.types.json import Jsonb

from tests.support.builders import fresh_phone
from tests.support.codes import queued_code, request, verify, wrong
from tests.support.database import Database
from tests.support.postgrest import SERVICE, PostgREST, user


@pytest.fixture(autouse=True)
def _no_cooldown(settings: object) -> None:
    # Most rules are about codes, not limits; test_limits.py covers those.
    settings(resend_cooldown_seconds=None, daily_limit_per_phone=None, hourly_limit_per_user=None)  # type: ignore[operator]


def test_request_returns_an_id_and_timings_never_the_code(api: PostgREST, database: Database, phone: str) -> None:
    body = request(api, phone, user())
    assert set(body) == {"request_id", "expires_in", "retry_after"}
    assert body["expires_in"] == 300
    code = queued_code(database, body["request_id"])
    assert re.fullmatch(r"[0-9]{6}", code)
    assert code not in str(body)


def test_only_a_keyed_hash_is_stored(database: Database, api: PostgREST, phone: str) -> None:
    body = request(api, phone, user())
    code = queued_code(database, body["request_id"])
    row = database.one("select to_jsonb(c)::text from sms.codes as c where c.id = %s", [body["request_id"]])
    assert code not in row
    unkeyed = database.one(
        "select encode(sha256(convert_to(%s || ':' || %s, 'UTF8')), 'hex')",
        [
            str(body["request_id"]),
            code,
        ],
    )
    assert unkeyed not in row


def test_code_length_follows_settings(api: PostgREST, database: Database, settings: object, phone: str) -> None:
    settings(code_length=4)  # type: ignore[operator]
    body = request(api, phone, user())
    assert re.fullmatch(r"[0-9]{4}", queued_code(database, body["request_id"]))


def test_codes_are_uniformly_random(database: Database) -> None:
    codes = [c for (c,) in database.execute("select sms._random_code(6) from generate_series(1, 4000)")]
    assert all(re.fullmatch(r"[0-9]{6}", c) for c in codes)
    assert len(set(codes)) > 3950
    # Each digit position: chi-square against uniform, 9 degrees of freedom, p < 0.0001 cut-off.
    for position in range(6):
        counts = Counter(c[position] for c in codes)
        chi2 = sum((counts[str(d)] - 400) ** 2 / 400 for d in range(10))
        assert chi2 < 33.7, (position, counts)


def test_right_code_verifies_exactly_once(api: PostgREST, database: Database, phone: str) -> None:
    caller = user()
    code = queued_code(database, request(api, phone, caller)["request_id"])
    assert verify(api, phone, code, caller) == {"valid": True}
    assert verify(api, phone, code, caller) == {"valid": False, "reason": "not_found", "attempts_left": 0}


def test_phone_forms_are_equivalent(api: PostgREST, database: Database) -> None:
    national = fresh_phone()[2:]
    caller = user()
    code = queued_code(database, request(api, "+86" + national, caller)["request_id"])
    for form in (
        "+86" + national,
        "86" + national,
        "0086" + national,
        national,
        "+86 " + national[:3] + "-" + national[3:7] + " " + national[7:],
    ):
        assert database.one("select sms._normalize_phone(%s)", [form]) == "86" + national
    assert verify(api, national, code, caller) == {"valid": True}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "12345",
        "+86 1301234123",
        "+8612012341234",
        "8610012341234",
        "+86130123412345",
        "１３０１２３４１２３４",
        "+86130'; drop table sms.codes; --",
        "1" * 40,
    ],
)
def test_invalid_numbers_are_http_400(api: PostgREST, bad: str) -> None:
    response = api.rpc("request_phone_code", {"phone": bad}, user())
    assert response.status == 400
    assert response.body["code"] == "invalid_phone"


def test_countries_outside_the_allow_list_are_refused(api: PostgREST, settings: object) -> None:
    # +1 301 234 1234 looks like a bare mainland number; the + decides.
    response = api.rpc("request_phone_code", {"phone": "+13012341234"}, user())
    assert (response.status, response.body["code"]) == (400, "phone_not_allowed")
    settings(allowed_country_codes=["86", "852"])  # type: ignore[operator]
    assert api.rpc("request_phone_code", {"phone": "+85291234567"}, user()).status == 200
    assert api.rpc("request_phone_code", {"phone": "+13012341235"}, user()).status == 400


def test_null_phone_is_http_400(api: PostgREST) -> None:
    assert api.rpc("request_phone_code", {"phone": None}, user()).status == 400


@pytest.mark.parametrize("purpose", ["", "Bind", "a" * 33, "bind phone", "绑定", "-x"])
def test_malformed_purpose_is_http_400(api: PostgREST, phone: str, purpose: str) -> None:
    response = api.rpc("request_phone_code", {"phone": phone, "purpose": purpose}, user())
    assert (response.status, response.body["code"]) == (400, "invalid_purpose")
    response = api.rpc("verify_phone_code", {"phone": phone, "code": "123456", "purpose": purpose}, user())
    assert (response.status, response.body["code"]) == (400, "invalid_purpose")


def test_a_new_code_invalidates_older_ones(api: PostgREST, database: Database, phone: str) -> None:
    caller = user()
    first = queued_code(database, request(api, phone, caller)["request_id"])
    second = queued_code(database, request(api, phone, caller)["request_id"])
    if first != second:
        assert verify(api, phone, first, caller)["valid"] is False
    assert verify(api, phone, second, caller) == {"valid": True}
    outstanding = database.one(
        "select count(*) from sms.codes where phone = %s and consumed_at is null and invalidated_at is null",
        [phone],
    )
    assert outstanding == 0


def test_purposes_are_separate(api: PostgREST, database: Database, phone: str) -> None:
    caller = user()
    login = queued_code(database, request(api, phone, caller)["request_id"])
    bind = queued_code(database, request(api, phone, caller, "bind_phone")["request_id"])
    assert verify(api, phone, bind, caller, "bind_phone") == {"valid": True}
    assert verify(api, phone, login, caller) == {"valid": True}


def test_failed_attempts_count_down_then_invalidate(api: PostgREST, database: Database, phone: str) -> None:
    caller = user()
    code = queued_code(database, request(api, phone, caller)["request_id"])
    assert verify(api, phone, wrong(code), caller) == {
        "valid": False,
        "reason": "mismatch",
        "attempts_left": 2,
    }
    assert verify(api, phone, "abc", caller) == {"valid": False, "reason": "mismatch", "attempts_left": 1}
    assert verify(api, phone, wrong(code), caller) == {
        "valid": False,
        "reason": "too_many_attempts",
        "attempts_left": 0,
    }
    # The failures were committed even though PostgREST rolls back on error: the right code is dead.
    assert verify(api, phone, code, caller) == {
        "valid": False,
        "reason": "too_many_attempts",
        "attempts_left": 0,
    }
    assert database.one("select attempts from sms.codes where phone = %s", [phone]) == 3


def test_max_attempts_follows_settings(api: PostgREST, database: Database, settings: object, phone: str) -> None:
    settings(max_attempts=1)  # type: ignore[operator]
    caller = user()
    code = queued_code(database, request(api, phone, caller)["request_id"])
    assert verify(api, phone, wrong(code), caller)["reason"] == "too_many_attempts"


def test_expired_codes_do_not_verify(api: PostgREST, database: Database, phone: str) -> None:
    caller = user()
    body = request(api, phone, caller)
    code = queued_code(database, body["request_id"])
    database.execute(
        "update sms.codes set expires_at = now() - interval '1 second' where id = %s", [body["request_id"]]
    )
    assert verify(api, phone, code, caller) == {"valid": False, "reason": "expired", "attempts_left": 0}


def test_unknown_phone_is_not_found(api: PostgREST, phone: str) -> None:
    assert verify(api, phone, "123456", user()) == {"valid": False, "reason": "not_found", "attempts_left": 0}


def test_a_users_code_verifies_only_for_that_user(api: PostgREST, database: Database, phone: str) -> None:
    alice, mallory = user(), user()
    code = queued_code(database, request(api, phone, alice)["request_id"])
    assert verify(api, phone, code, mallory) == {"valid": False, "reason": "not_found", "attempts_left": 0}
    assert verify(api, phone, code, SERVICE)["valid"] is False
    assert verify(api, phone, code, alice) == {"valid": True}


def test_service_role_codes_are_not_bound_to_a_user(api: PostgREST, database: Database, phone: str) -> None:
    code = queued_code(database, request(api, phone, SERVICE)["request_id"])
    assert verify(api, phone, code, SERVICE) == {"valid": True}


def test_test_numbers_use_the_fixed_code_and_are_never_sent(
    api: PostgREST, database: Database, settings: object, phone: str
) -> None:
    settings(test_codes={phone: "246810"})  # type: ignore[operator]
    caller = user()
    body = request(api, "+" + phone, caller)
    status, code = database.one("select status, code from sms.outbox where code_id = %s", [body["request_id"]])
    assert (status, code) == ("sent", None)
    claimable = database.one(
        "select count(*) from sms.outbox where phone = %s and status in ('queued', 'sending')", [phone]
    )
    assert claimable == 0
    assert verify(api, phone, "246810", caller) == {"valid": True}


def test_status_reports_the_callers_own_requests(api: PostgREST, phone: str) -> None:
    alice = user()
    request_id = request(api, phone, alice)["request_id"]
    status = api.rpc("phone_code_status", {"request_id": request_id}, alice)
    assert (status.status, status.body) == (200, {"status": "queued", "error": None, "delivered": None})
    assert api.rpc("phone_code_status", {"request_id": request_id}, SERVICE).status == 200
    assert api.rpc("phone_code_status", {"request_id": request_id}, user()).status == 404
    assert api.rpc("phone_code_status", {"request_id": str(uuid.uuid4())}, alice).status == 404


def test_status_follows_delivery(api: PostgREST, database: Database, phone: str) -> None:
    alice = user()
    request_id = request(api, phone, alice)["request_id"]
    delivery = database.one("select delivery_id from sms.claim_messages('w1', 100, 60) where phone = %s", [phone])
    assert api.rpc("phone_code_status", {"request_id": request_id}, alice).body["status"] == "sending"
    result = {"delivery_id": delivery, "outcome": "rejected", "provider": "aliyun",
              "provider_code": "isv.MOBILE_NUMBER_ILLEGAL", "provider_message": "illegal number"}  # fmt: skip
    database.execute("select sms.finish_deliveries(%s)", [Jsonb([result])])
    assert api.rpc("phone_code_status", {"request_id": request_id}, alice).body == {
        "status": "failed",
        "error": "illegal number",
        "delivered": None,
    }


def test_verify_rejects_missing_or_huge_codes(api: PostgREST, phone: str) -> None:
    for code in (None, "1" * 65):
        response = api.rpc("verify_phone_code", {"phone": phone, "code": code}, user())
        assert (response.status, response.body["code"]) == (400, "invalid_code")
