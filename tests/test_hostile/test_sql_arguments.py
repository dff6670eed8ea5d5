"""Hostile input: fuzzing the SQL functions through PostgREST."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import event, given, settings as fuzz_settings, strategies as st

from tests.support.builders import without_send_limits
from tests.support.database import Database
from tests.support.hostile import ARABIC_INDIC, FULLWIDTH, FUZZ, PURPOSE_RE, SQL_METACHARACTERS, digits
from tests.support.postgrest import SERVICE, Caller, PostgREST, user

# --------------------------------------------------------------------------------------------------
# Fuzzing the SQL functions through PostgREST


def national_numbers() -> st.SearchStrategy[str]:
    return st.tuples(st.sampled_from("3456789"), st.integers(0, 10**9 - 1)).map(lambda t: f"1{t[0]}{t[1]:09d}")


@st.composite
def phone_inputs(draw: st.DrawFn) -> tuple[Any, bool]:
    """A phone argument, and whether it must be accepted (an ASCII-decorated mainland number)."""
    national = draw(national_numbers())
    prefix = draw(st.sampled_from(["", "+86", "86", "0086", "+86 ", "+86-"]))
    if draw(st.booleans()):
        pieces = [national[:3], national[3:7], national[7:]]
        sep = draw(st.sampled_from([" ", "-", "  "]))
        decorated = prefix + sep.join(pieces)
        if prefix and draw(st.booleans()):
            decorated = f"{prefix}({national[:3]}){national[3:]}"
    else:
        decorated = prefix + national
    decorated = draw(st.sampled_from(["", " "])) + decorated + draw(st.sampled_from(["", " "]))
    valid = (decorated, len(decorated) <= 32)
    # A valid number with something around or inside it: refused, or (separators only) read as that number.
    spoiled = [
        ("+86" + national).translate(FULLWIDTH),
        national.translate(ARABIC_INDIC),
        "+86" + national + "\x00",
        "\x00" + national,
        "+86" + national + "1",
        "+8" + national,
        "+1" + national[1:],
        "+" + national,
        "+86" + national + "#123",
        "+86 " + national + " ext 5",
        "tel:+86" + national,
        "+86" + national + "abc",
        "+86" + national + "\n--",
        "+86" + national + "/*",
        "+86" + national + "'",
        national + "' or '1'='1",
        "'" + national,
        "+86" + national + "; drop table sms.codes; --",
        "+86\u200b" + national,
        "+86" + national + ",+8613800138000",
    ]
    hostile = draw(
        st.one_of(
            st.text(max_size=40),
            st.text(st.sampled_from("0123456789+-() \t\n\u00a0\u3000\u200b\x00"), max_size=40),
            st.sampled_from(spoiled),
            st.sampled_from(SQL_METACHARACTERS),
            st.integers(33, 200_000).map(lambda n: "1" * n),
            st.integers(1, 20_000).map(lambda n: " " * n + national),
            st.none(),
        )
    )
    return draw(st.one_of(st.just(valid), st.just((hostile, False))))


@st.composite
def purpose_inputs(draw: st.DrawFn) -> tuple[Any, bool]:
    """A purpose argument (absent = the default), and whether it is well formed."""
    good = draw(st.from_regex(PURPOSE_RE, fullmatch=True))
    hostile = draw(
        st.one_of(
            st.text(max_size=40),
            st.sampled_from(SQL_METACHARACTERS),
            st.sampled_from(["Default", "default ", " default", "default\n", "défault", "ｄｅｆａｕｌｔ", "a" * 33]),
            st.just("default\x00"),
            st.integers(33, 100_000).map(lambda n: "a" * n),
            st.none(),
        )
    )
    choice = draw(st.sampled_from(["absent", "good", "hostile"]))
    if choice == "absent":
        return ("<absent>", True)
    if choice == "good":
        return (good, True)
    return (hostile, isinstance(hostile, str) and PURPOSE_RE.fullmatch(hostile) is not None)


ip_headers = st.one_of(
    st.just({}),
    st.ip_addresses().map(lambda ip: {"x_real_ip": str(ip)}),
    st.text(max_size=60).map(lambda t: {"x_real_ip": t}),
    st.text(max_size=60).map(lambda t: {"x_forwarded_for": t}),
    st.sampled_from(SQL_METACHARACTERS).map(lambda t: {"x_forwarded_for": "203.0.113.9, " + t}),
    st.sampled_from(["::1", "203.0.113.7:443", "[2001:db8::1]", "203.0.113.7/0", "0.0.0.0/0", ""]).map(
        lambda t: {"x_real_ip": t}
    ),
)


def table_counts(database: Database) -> tuple[int, int]:
    return database.one("select (select count(*) from sms.outbox), (select count(*) from sms.codes)")  # type: ignore[no-any-return]


@pytest.fixture
def unlimited(settings: Any) -> None:
    """No sending limits and 100 attempts, once per fuzzing test (not per example): the fuzzing is about
    what the functions accept, and must not run into limits the examples before it used up."""
    without_send_limits(settings, max_attempts=100)


@fuzz_settings(max_examples=120, **FUZZ)
@given(phone=phone_inputs(), purpose=purpose_inputs(), who=st.sampled_from(["user", "service"]), ip=ip_headers)
def test_fuzzed_code_requests(
    api: PostgREST,
    database: Database,
    unlimited: None,
    phone: tuple[Any, bool],
    purpose: tuple[Any, bool],
    who: str,
    ip: dict[str, str],
) -> None:
    (phone_arg, must_accept), (purpose_arg, purpose_ok) = phone, purpose
    headers = {k.replace("_", "-"): v for k, v in ip.items()}
    caller = user(**ip) if who == "user" else Caller("service_role", headers=headers)
    args = {"phone": phone_arg} if purpose_arg == "<absent>" else {"phone": phone_arg, "purpose": purpose_arg}
    before = table_counts(database)
    response = api.rpc("request_phone_code", args, caller)
    after = table_counts(database)
    event(f"status={response.status} must_accept={must_accept and purpose_ok}")
    assert response.status in (200, 400), (response.status, response.body)
    if response.status != 200:
        assert after == before, "a refused request left rows behind"
        assert not (must_accept and purpose_ok), response.body
        return
    assert after == (before[0] + 1, before[1] + 1)
    row = database.one(
        "select jsonb_build_object('phone', phone, 'purpose', purpose, 'status', status, 'code', code)"
        " from sms.outbox where code_id = %s",
        [response.body["request_id"]],
    )
    assert re.fullmatch(r"861[3-9][0-9]{9}", row["phone"]), row
    assert isinstance(phone_arg, str), phone_arg
    # Accepted means: digits, a leading + and separators, nothing else (letters, quotes, NULs, ...).
    assert all((c.isascii() and c.isdigit()) or c in "+()-" or c.isspace() for c in phone_arg), (phone_arg, row)
    assert digits(phone_arg) in {row["phone"][2:], row["phone"], "00" + row["phone"]}, (phone_arg, row)
    assert row["purpose"] == ("default" if purpose_arg == "<absent>" else purpose_arg) and purpose_ok
    assert row["status"] == "queued" and re.fullmatch(r"[0-9]{6}", row["code"])
    assert set(response.body) == {"request_id", "expires_in", "retry_after"}


def code_candidates(real: str) -> st.SearchStrategy[Any]:
    n = len(real)

    def change(position: int, delta: int) -> str:
        return real[:position] + str((int(real[position]) + delta) % 10) + real[position + 1 :]

    return st.one_of(
        st.just(real),
        st.builds(change, st.integers(0, n - 1), st.integers(1, 9)),
        st.builds(change, st.just(n - 1), st.integers(1, 9)),  # the near miss: same prefix
        st.sampled_from(
            [
                real[:-1],
                real + "0",
                "0" + real,
                " " + real,
                real + " ",
                real + "\n",
                real + "\x00",
                "+" + real,
                real.translate(FULLWIDTH),
                real.translate(ARABIC_INDIC),
                real * 2,
                real[::-1],
                "",
                "%",
                "_" * n,
                real + "' or '1'='1",
                "' or '1'='1",
                real + "--",
                str(int(real)),
                f"{real[:3]} {real[3:]}",
            ]
        ),  # fmt: skip
        st.sampled_from(SQL_METACHARACTERS),
        st.from_regex(r"[0-9]{1,8}", fullmatch=True),
        st.text(max_size=70),
        st.integers(60, 100_000).map(lambda k: real * (k // n)),
        st.none(),
    )


@fuzz_settings(max_examples=60, **FUZZ)
@given(data=st.data(), who=st.sampled_from(["user", "service"]))
def test_fuzzed_codes_never_verify_unless_issued(
    api: PostgREST, database: Database, unlimited: None, data: st.DataObject, who: str
) -> None:
    caller = user() if who == "user" else SERVICE
    phone = "86" + data.draw(national_numbers())
    issued = api.rpc("request_phone_code", {"phone": "+" + phone}, caller)
    assert issued.status == 200, issued.body
    real = database.one("select code from sms.outbox where code_id = %s", [issued.body["request_id"]])
    forms = ["+" + phone, phone, "00" + phone, phone[2:], f"+86 {phone[2:5]} {phone[5:9]} {phone[9:]}"]
    mismatches, consumed = 0, False
    for candidate in data.draw(st.lists(code_candidates(real), min_size=1, max_size=6)):
        form = data.draw(st.sampled_from(forms))
        response = api.rpc("verify_phone_code", {"phone": form, "code": candidate}, caller)
        event(f"status={response.status} right={candidate == real}")
        assert response.status in (200, 400), (response.status, response.body)
        if response.status == 400:
            continue
        body = response.body
        if candidate == real and not consumed:
            assert body == {"valid": True}, (candidate, body)
            consumed = True
        elif consumed:
            assert body == {"valid": False, "reason": "not_found", "attempts_left": 0}, (candidate, body)
        else:
            mismatches += 1
            assert body == {"valid": False, "reason": "mismatch", "attempts_left": 100 - mismatches}, (candidate, body)
    # Only mismatches that were answered as such counted; a 400 cost no attempt.
    assert database.one("select attempts from sms.codes where id = %s", [issued.body["request_id"]]) == mismatches
    if not consumed:
        assert api.rpc("verify_phone_code", {"phone": phone, "code": real}, caller).body == {"valid": True}


request_ids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: u.hex),
    st.text(max_size=50),
    st.sampled_from(SQL_METACHARACTERS),
    st.just("00000000-0000-0000-0000-000000000000"),
    st.integers(40, 100_000).map(lambda n: "a" * n),
    st.none(),
)


@fuzz_settings(max_examples=100, **FUZZ)
@given(request_id=request_ids, who=st.sampled_from(["user", "service"]))
def test_fuzzed_status_lookups_find_nothing(api: PostgREST, database: Database, request_id: Any, who: str) -> None:
    before = table_counts(database)
    response = api.rpc("phone_code_status", {"request_id": request_id}, user() if who == "user" else SERVICE)
    assert response.status in (400, 404), (response.status, response.body)
    if response.status == 404:
        assert response.body["code"] == "request_not_found"
    assert table_counts(database) == before
