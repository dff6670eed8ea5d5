"""Hostile input: enumeration."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.support.builders import fresh_phone, without_send_limits
from tests.support.codes import queued_code, request_id, verify, wrong
from tests.support.database import Database
from tests.support.postgrest import SERVICE, PostgREST, user

# --------------------------------------------------------------------------------------------------
# Enumeration


def test_status_of_other_users_requests_looks_like_unknown_ids(api: PostgREST, settings: Any) -> None:
    without_send_limits(settings)
    alice, mallory = user(), user()
    alices = [request_id(api, fresh_phone(), alice) for _ in range(3)]
    backend = request_id(api, fresh_phone(), SERVICE)  # bound to no user
    unknown = [str(uuid.uuid4()), "00000000-0000-0000-0000-000000000000"]
    answers = [api.rpc("phone_code_status", {"request_id": rid}, mallory) for rid in [*alices, backend, *unknown]]
    assert {(a.status, json.dumps(a.body, sort_keys=True), json.dumps(a.headers, sort_keys=True)) for a in answers} == {
        (404, json.dumps(answers[-1].body, sort_keys=True), "{}")
    }
    assert api.rpc("phone_code_status", {"request_id": alices[0]}, alice).status == 200


def test_verify_cannot_tell_no_code_from_another_users_code(api: PostgREST, database: Database, settings: Any) -> None:
    without_send_limits(settings)
    alice, mallory = user(), user()
    taken, empty = fresh_phone(), fresh_phone()
    rid = request_id(api, taken, alice)
    code = queued_code(database, rid)
    for guess in ("000000", "123456", code):
        on_taken = api.rpc("verify_phone_code", {"phone": taken, "code": guess}, mallory)
        on_empty = api.rpc("verify_phone_code", {"phone": empty, "code": guess}, mallory)
        assert (on_taken.status, on_taken.body, on_taken.headers) == (on_empty.status, on_empty.body, on_empty.headers)
        assert on_taken.body == {"valid": False, "reason": "not_found", "attempts_left": 0}
    assert database.one("select attempts from sms.codes where id = %s", [rid]) == 0


# --------------------------------------------------------------------------------------------------
# Brute force


def test_failures_are_counted_per_purpose_and_each_purpose_is_capped(
    api: PostgREST, database: Database, settings: Any
) -> None:
    without_send_limits(settings, max_attempts=3)
    alice, phone = user(), fresh_phone()
    login = queued_code(database, request_id(api, phone, alice, "login"))
    bind = queued_code(database, request_id(api, phone, alice, "bind_phone"))
    forms = ["+" + phone, "00" + phone, phone[2:]]  # how the number is written changes nothing

    assert verify(api, forms[0], wrong(login, 1), alice, "login")["attempts_left"] == 2
    assert verify(api, forms[1], wrong(login, 2), alice, "login")["attempts_left"] == 1
    # Purpose B starts from its own count, and A's code is no good there.
    first_b = verify(api, forms[2], login if login != bind else wrong(bind), alice, "bind_phone")
    assert first_b == {"valid": False, "reason": "mismatch", "attempts_left": 2}
    # A's third failure ends A; B is untouched by it.
    assert verify(api, forms[2], wrong(login, 3), alice, "login")["reason"] == "too_many_attempts"
    assert verify(api, phone, login, alice, "login") == {"valid": False, "reason": "too_many_attempts",
                                                        "attempts_left": 0}  # fmt: skip
    assert verify(api, phone, wrong(bind, 4), alice, "bind_phone")["attempts_left"] == 1
    assert verify(api, phone, bind, alice, "bind_phone") == {"valid": True}

    # And B caps at max_attempts too.
    pay = queued_code(database, request_id(api, phone, alice, "pay"))
    for delta in (1, 2, 3):
        verify(api, phone, wrong(pay, delta), alice, "pay")
    assert verify(api, phone, pay, alice, "pay")["reason"] == "too_many_attempts"
    assert database.one("select max(attempts) from sms.codes where phone = %s", [phone]) == 3


def test_other_users_cannot_help_brute_force_a_code(api: PostgREST, database: Database, settings: Any) -> None:
    without_send_limits(settings, max_attempts=3)
    alice, phone = user(), fresh_phone()
    rid = request_id(api, phone, alice)
    code = queued_code(database, rid)
    helpers = [user() for _ in range(20)] + [SERVICE]
    guesses = [f"{n:06d}" for n in range(0, 10**6, 10**6 // 150)] + [code]
    answers = set()
    with ThreadPoolExecutor(8) as pool:
        for helper in helpers:
            tries = [(g, helper) for g in guesses[::7] + [code]]
            answers.update(pool.map(lambda t: json.dumps(verify(api, phone, *t), sort_keys=True), tries))
    # Every helper learns the same nothing, even for the right code, and none of it counts against Alice.
    assert answers == {json.dumps({"valid": False, "reason": "not_found", "attempts_left": 0}, sort_keys=True)}
    assert database.one("select (attempts, consumed_at is null, invalidated_at is null)::text from sms.codes"
                        " where id = %s", [rid]) == "(0,t,t)"  # fmt: skip
    # Alice still has all her attempts; after max_attempts failures her right code is dead.
    for delta in (1, 2):
        verify(api, phone, wrong(code, delta), alice)
    assert verify(api, phone, wrong(code, 3), alice)["reason"] == "too_many_attempts"
    assert verify(api, phone, code, alice)["valid"] is False
