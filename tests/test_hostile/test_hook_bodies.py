"""Hostile input: fuzzing the hook: what an authentic (GoTrue-signed) body may contain."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, given, settings as fuzz_settings, strategies as st

from sidecar.hook import MAX_BODY_BYTES
from tests.support.builders import fresh_phone
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import (
    go_json,
    make_user,
    otp_login,
)
from tests.support.hostile import (
    FUZZ,
    NEW,
    OLD,
    SQL_METACHARACTERS,
    InProcess,
    answer_kind,
    assert_plausible_send,
    mainland,
    signed,
)

# --------------------------------------------------------------------------------------------------
# Fuzzing the hook: what an authentic (GoTrue-signed) body may contain


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
hook_phones = st.one_of(
    mainland,
    mainland.map(lambda p: "+" + p),
    st.sampled_from(["881612345678", "8823434567", "5351234567", "252612345678", "19005550123", "37120000000"]),
    st.text(max_size=20),
    st.sampled_from(SQL_METACHARACTERS),
    st.integers(8613000000000, 8613999999999),
    json_values,
    st.integers(40, 5000).map(lambda n: "8" * n),
)


def fuzz_payload(
    version: tuple[int, int, int],
    phone: Any,
    otp: Any,
    user_phone: Any,
    ip: Any,
    user_metadata: Any,
    sms_type: Any,
    drop: list[str],
) -> bytes:
    user = make_user(phone="8613012341234", user_metadata={"nickname": "x"})
    payload = otp_login(version, phone="8613012341234", user=user)
    sms = payload.get("sms", payload)
    sms["otp"], sms["phone"] = otp, phone
    if sms_type is not None:
        sms["sms_type"] = sms_type
    if "user" in payload:
        payload["user"]["phone"] = user_phone
        payload["user"]["user_metadata"] = user_metadata
    if "metadata" in payload:
        payload["metadata"]["ip_address"] = ip
    for key in drop:
        payload.pop(key, None)
        sms.pop(key, None)
    return json.dumps(payload, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


def nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    inner = b'{"a":' * depth + b"1" + b"}" * depth
    body = go_json(otp_login(NEW, phone="8613012341234"))
    return body[:-1] + b',"x":' + inner + b"}"


signed_bodies = st.one_of(
    st.binary(max_size=500),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")),
    st.builds(
        fuzz_payload,
        st.sampled_from([(2, 140, 0), OLD, NEW]),
        hook_phones,
        st.one_of(st.from_regex(r"[0-9]{4,10}", fullmatch=True), json_values),
        hook_phones,
        st.one_of(st.ip_addresses().map(str), json_values),
        json_values,
        st.none() | st.sampled_from(["mfa", "sms", ""]) | json_values,
        st.lists(st.sampled_from(["sms", "user", "otp", "phone", "metadata"]), max_size=2),
    ),
    st.builds(nested, st.sampled_from([10, 500, 999, 1000, 5000, 20000]), st.sampled_from(["array", "object", "tail"])),
    st.sampled_from(
        [
            b'{"sms": {"otp": "123456", "phone": "8613012341234"}, "sms": {"otp": "1", "phone": "1"}}',
            b'\xef\xbb\xbf{"sms": {"otp": "123456", "phone": "8613012341234"}}',
            '{"sms": {"otp": "123456", "phone": "8613012341234"}}'.encode("utf-16"),
            b'{"sms": {"otp": "123456", "phone": "8613012341234"}}\x00',
            b'{"otp": "123456", "phone": "86130123412345' + b"6" * 5000 + b'"}',
            b'{"otp": ' + b"1" * 5000 + b', "phone": "8613012341234"}',
            b'{"sms": {"otp": "\\u0031\\u0032\\u0033\\u0034", "phone": "\\u0038\\u0036..."}}',
        ]
    ),
    st.integers(MAX_BODY_BYTES - 20, MAX_BODY_BYTES + 5000).map(lambda n: b'{"pad": "' + b"x" * n + b'"}'),
)


@fuzz_settings(max_examples=400, **FUZZ)
@given(body=signed_bodies)
def test_fuzzed_bodies_signed_by_gotrue(hook: InProcess, fake: FakeAliyun, body: bytes) -> None:
    seen = fake.requests_seen
    response = hook.post(body, signed(body))
    kind = answer_kind(response)
    event(f"status={response.status_code} {kind}")
    assert response.status_code != 401, response.text
    if len(body) > MAX_BODY_BYTES:
        assert response.status_code == 413, response.text
    if fake.requests_seen != seen:
        assert kind == "success", response.text
        (sent,) = fake.sends[-1:]
        assert_plausible_send(sent, body)


@pytest.mark.parametrize(
    "metadata",
    [{"nickname": "a\u0000b"}, {"bio": "\u0000"}],
    ids=["nul-in-name", "nul-alone"],
)
def test_a_nul_in_user_metadata_does_not_stop_the_sms(
    hook: InProcess, fake: FakeAliyun, metadata: dict[str, str]
) -> None:
    # Any user can store this through PUT /user {"data": ...}; Go's json.Marshal writes it as \u0000,
    # and GoTrue sends the whole user in every Send SMS event.
    phone = fresh_phone()
    user_ = make_user(phone=phone, user_metadata=metadata)
    result = hook.gotrue(otp_login(NEW, phone=phone, user=user_))
    assert result.outcome == "success", result.outcome
    assert [s.phone_numbers for s in fake.wait_for_sends(1)] == [phone[2:]]


UNSTORABLE = {"nan": b"NaN", "inf": b"-Infinity", "surrogate": b'"\\ud800"', "nul": b'"86\\u0000"'}


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
@pytest.mark.parametrize("where", ["unused-field", "sms.phone", "sms.otp"])
@pytest.mark.parametrize("version", [NEW, OLD], ids=["metadata", "no-metadata"])
def test_signed_json_postgres_cannot_store_is_not_an_outage(
    hook: InProcess, fake: FakeAliyun, value: bytes, where: str, version: tuple[int, int, int]
) -> None:
    phone = fresh_phone()
    payload = go_json(otp_login(version, phone=phone, otp="482915"))
    if where == "unused-field":
        hostile = payload[:-1] + b',"extra":' + value + b"}"
    elif where == "sms.phone":
        hostile = payload.replace(b'"phone":"' + phone.encode() + b'"}', b'"phone":' + value + b"}")
    else:
        hostile = payload.replace(b'"otp":"482915"', b'"otp":' + value)
    assert hostile != payload
    response = hook.post(hostile, signed(hostile))
    kind = answer_kind(response)  # never 502/503: the database is fine, the input is not
    if where == "unused-field" and kind == "success":
        assert len(fake.sends) == 1  # a field nobody reads may be ignored
        return
    assert response.json()["error"]["http_code"] == 400, response.text
    assert fake.requests_seen == 0


@pytest.mark.parametrize("depth", [1000, 5000])
def test_deeply_nested_signed_json_is_answered_not_crashed(hook: InProcess, fake: FakeAliyun, depth: int) -> None:
    # GoTrue marshals user_metadata of any depth (its own JSON reader allows 10000 levels).
    phone = fresh_phone()
    body = nested(depth, "tail").replace(b"8613012341234", phone.encode())
    response = hook.post(body, signed(body))  # a crash inside the app raises here
    kind = answer_kind(response)
    assert kind == "success" or response.json()["error"]["http_code"] == 400, response.text
    assert fake.requests_seen == (1 if kind == "success" else 0)
