"""The GoTrue emulator (tests/gotrue.py): Go's JSON bytes, payload shapes, signing, and the caller's
version-dependent reading of the hook's answer (reference §2, §4-§6, §11)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.webhook import WebhookVerifier, parse_secrets
from tests.support.gotrue import (
    DEFAULT_VERSION,
    MFA_FAILURE,
    GoTrueHookCaller,
    HookResult,
    SigningError,
    go_base64_decode,
    go_json,
    go_map,
    go_parse_media_type,
    go_time,
    make_metadata,
    make_phone_factor,
    make_phone_identity,
    make_user,
    mfa_challenge,
    otp_login,
    phone_change,
    send_sms_payload,
    sign,
    split_secrets,
)

SECRET = "v1,whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "v1,whsec_" + base64.b64encode(b"o" * 32).decode()
URL = "http://hook.test/sms?x=1"

# ---------------------------------------------------------------------------------------------------
# Go's json.Marshal


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('<a href="x">&</a>', rb'"\u003ca href=\"x\"\u003e\u0026\u003c/a\u003e"'),
        ("a\u2028b\u2029c", rb'"a\u2028b\u2029c"'),
        ("验证码：012345", '"验证码：012345"'.encode()),
        ("😀 ok", b'"\xf0\x9f\x98\x80 ok"'),
        ("\x00\x01\x1f\x7f", rb'"\u0000\u0001\u001f' + b'\x7f"'),
        ("\t\n\r\b\f", rb'"\t\n\r\b\f"'),
        ('quote " back \\ slash /', rb'"quote \" back \\ slash /"'),
        ("\ufffd", b'"\xef\xbf\xbd"'),  # a real U+FFFD stays raw
        (b"ab\xffc".decode("utf-8", "surrogateescape"), rb'"ab\ufffdc"'),  # an invalid byte
        ("", b'""'),
    ],
)
def test_go_json_escapes_strings_like_go(value: str, expected: bytes) -> None:
    assert go_json(value) == expected


def test_go_json_is_compact_keeps_field_order_and_has_no_trailing_newline() -> None:
    value = {"z": 1, "a": [True, False, None], "m": {"b": -2, "a": "x"}, "big": 2**62}
    assert go_json(value) == b'{"z":1,"a":[true,false,null],"m":{"b":-2,"a":"x"},"big":4611686018427387904}'


def test_go_map_sorts_keys_at_every_level_including_escaped_ones() -> None:
    value = go_map({"b": {"y": 1, "x": [{"d": 1, "c": 2}]}, "a": 0, "<": 1, "A": 2, "é": 3})
    assert go_json(value) == '{"\\u003c":1,"A":2,"a":0,"b":{"x":[{"c":2,"d":1}],"y":1},"é":3}'.encode()
    # Go sorts by the raw key ("<" is 0x3c, before "A"), before escaping it.
    assert list(value) == ["<", "A", "a", "b", "é"]


def test_go_json_before_go_1_22_writes_b_and_f_as_unicode_escapes() -> None:
    assert go_json("\b\f", go_before_1_22=True) == rb'"\u0008\u000c"'
    # A literal backslash followed by "b" is not an escape.
    assert go_json("\\b\\\b", go_before_1_22=True) == rb'"\\b\\\u0008"'


def test_go_json_refuses_floats_and_non_string_keys() -> None:
    with pytest.raises(TypeError):
        go_json({"a": [1.5]})
    with pytest.raises(TypeError):
        go_json({1: "a"})


@pytest.mark.parametrize(
    ("moment", "nanosecond", "expected"),
    [
        (datetime(2024, 5, 13, 11, 52, 48, 157306, UTC), None, "2024-05-13T11:52:48.157306Z"),
        (datetime(2024, 5, 13, 11, 52, 48, 157300, UTC), None, "2024-05-13T11:52:48.1573Z"),
        (datetime(2024, 5, 13, 11, 52, 48, 0, UTC), None, "2024-05-13T11:52:48Z"),
        (datetime(2024, 5, 13, 11, 52, 48, 0, UTC), 123456789, "2024-05-13T11:52:48.123456789Z"),
        (datetime(2024, 5, 13, 11, 52, 48, 0, UTC), 5, "2024-05-13T11:52:48.000000005Z"),
        (datetime(2024, 5, 13, 19, 52, 48, 500000, timezone(timedelta(hours=8))), None, "2024-05-13T19:52:48.5+08:00"),
        (
            datetime(2024, 5, 13, 6, 0, 0, 0, timezone(timedelta(hours=-5, minutes=-30))),
            None,
            "2024-05-13T06:00:00-05:30",
        ),
    ],
)
def test_go_time_formats_rfc3339nano(moment: datetime, nanosecond: int | None, expected: str) -> None:
    assert go_time(moment, nanosecond=nanosecond) == expected


def test_go_time_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError):
        go_time(datetime(2024, 5, 13))


USER_ID = "2d1fbd1c-9b5e-4f7b-9a57-5f8b5c1e0a11"
META_ID = "6b7e7f0e-3f6a-4c55-9a3e-2a6c1e9b4d22"


def test_full_payload_bytes_for_v2_187() -> None:
    user = make_user(
        id=USER_ID,
        phone="8613012341234",
        user_metadata={"nick": "<小明>", "age": 30, "tags": ["a&b"]},
        identities=None,
    )
    metadata = make_metadata(uuid_=META_ID, time_="2026-03-02T06:05:00.123456789Z", ip_address="203.0.113.9")
    payload = otp_login("2.187.0", phone="8613012341234", otp="012345", user=user, metadata=metadata)
    expected = (
        '{"metadata":{"uuid":"6b7e7f0e-3f6a-4c55-9a3e-2a6c1e9b4d22","time":"2026-03-02T06:05:00.123456789Z",'
        '"name":"send-sms","ip_address":"203.0.113.9"},'
        '"user":{"id":"2d1fbd1c-9b5e-4f7b-9a57-5f8b5c1e0a11","aud":"authenticated","role":"authenticated",'
        '"email":"","phone":"8613012341234","phone_confirmed_at":"2026-01-05T08:31:02.117Z",'
        '"confirmation_sent_at":"2026-03-02T06:00:41.9031Z","confirmed_at":"2026-01-05T08:31:02.117Z",'
        '"last_sign_in_at":"2026-03-02T06:01:05.52447Z",'
        '"app_metadata":{"provider":"phone","providers":["phone"]},'
        '"user_metadata":{"age":30,"nick":"\\u003c小明\\u003e","tags":["a\\u0026b"]},'
        '"identities":null,"created_at":"2026-01-05T08:30:12.345678Z",'
        '"updated_at":"2026-03-02T06:01:05.530012Z","is_anonymous":false},'
        '"sms":{"otp":"012345","phone":"8613012341234"}}'
    ).encode()
    assert go_json(payload) == expected


def test_full_payload_bytes_for_flat_v2_149() -> None:
    payload = otp_login("2.149.0", otp="000777", user=make_user(id=USER_ID, phone="8613012341234"))
    assert go_json(payload) == (
        b'{"user_id":"2d1fbd1c-9b5e-4f7b-9a57-5f8b5c1e0a11","phone":"8613012341234","otp":"000777"}'
    )


# ---------------------------------------------------------------------------------------------------
# Payload shapes


USER_FIELDS = (
    "id aud role email email_confirmed_at invited_at phone phone_confirmed_at confirmation_sent_at "
    "confirmed_at recovery_sent_at new_email email_change_sent_at new_phone phone_change_sent_at "
    "reauthentication_sent_at last_sign_in_at app_metadata user_metadata factors identities created_at "
    "updated_at banned_until deleted_at is_anonymous"
).split()


def test_user_fields_follow_go_declaration_order_and_omitempty() -> None:
    every = make_user(
        email="a@example.com",
        email_confirmed_at="t1",
        invited_at="t0",
        recovery_sent_at="t2",
        new_email="b@example.com",
        email_change_sent_at="t3",
        new_phone="8613100000000",
        phone_change_sent_at="t4",
        reauthentication_sent_at="t5",
        factors=[make_phone_factor(phone="8613200000000")],
        banned_until="t6",
        deleted_at="t7",
    )
    assert list(every) == USER_FIELDS
    minimal = make_user(phone="", phone_confirmed_at=None, confirmation_sent_at=None, last_sign_in_at=None)
    assert list(minimal) == [
        "id", "aud", "role", "email", "phone", "app_metadata", "user_metadata", "identities",
        "created_at", "updated_at", "is_anonymous",
    ]  # fmt: skip
    assert minimal["email"] == "" and minimal["phone"] == "" and minimal["identities"] == []
    assert re.fullmatch(r"[0-9a-f-]{36}", minimal["id"]) and uuid.UUID(minimal["id"]).version == 4


def test_confirmed_at_is_the_earlier_confirmation() -> None:
    user = make_user(email_confirmed_at="2026-01-01T00:00:00Z", phone_confirmed_at="2026-02-01T00:00:00Z")
    assert user["confirmed_at"] == "2026-01-01T00:00:00Z"
    assert "confirmed_at" not in make_user(phone_confirmed_at=None)


def test_factor_and_identity_fields() -> None:
    factor = make_phone_factor(phone="8613200000000", friendly_name="work")
    assert list(factor) == [
        "id", "created_at", "updated_at", "status", "friendly_name", "factor_type", "phone", "last_challenged_at",
    ]  # fmt: skip
    assert factor["factor_type"] == "phone" and factor["last_challenged_at"] is None
    identity = make_phone_identity(user_id=USER_ID, phone="8613012341234")
    assert list(identity) == [
        "identity_id", "id", "user_id", "identity_data", "provider", "last_sign_in_at", "created_at", "updated_at",
    ]  # fmt: skip
    assert list(identity["identity_data"]) == ["email_verified", "phone", "phone_verified", "sub"]


@pytest.mark.parametrize(
    ("version", "top", "sms"),
    [
        ("2.146.0", ["user_id", "phone", "otp"], None),
        ("2.149.0", ["user_id", "phone", "otp"], None),
        ("2.150.0", ["user", "sms"], ["otp"]),
        ("2.179.0", ["user", "sms"], ["otp"]),
        ("2.180.0", ["user", "sms"], ["otp", "phone"]),
        ("2.186.0", ["user", "sms"], ["otp", "phone"]),
        ("2.187.0", ["metadata", "user", "sms"], ["otp", "phone"]),
        ("2.196.0", ["metadata", "user", "sms"], ["otp", "phone"]),
    ],
)
def test_login_shape_per_version(version: str, top: list[str], sms: list[str] | None) -> None:
    payload = otp_login(version, phone="8613012341234", otp="012345")
    assert list(payload) == top
    if sms is None:
        assert payload["phone"] == "8613012341234" and payload["otp"] == "012345"
    else:
        assert list(payload["sms"]) == sms and payload["sms"]["otp"] == "012345"


def test_metadata_is_fresh_and_well_formed() -> None:
    first, second = make_metadata(), make_metadata(ip_address="198.51.100.7")
    assert list(first) == ["uuid", "time", "name"] and first["name"] == "send-sms"
    assert list(second) == ["uuid", "time", "name", "ip_address"]
    assert first["uuid"] != second["uuid"] and uuid.UUID(first["uuid"]).version == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", first["time"])


@pytest.mark.parametrize("version", ["2.149.0", "2.179.0", "2.180.0", "2.187.0"])
def test_phone_change_shape(version: str) -> None:
    payload = phone_change(version, old_phone="8613000000001", new_phone="8613000000002", otp="123456")
    if version == "2.149.0":  # only user.phone existed: the OLD number
        assert payload["phone"] == "8613000000001"
        return
    assert payload["user"]["phone"] == "8613000000001"
    assert payload["user"]["new_phone"] == "8613000000002"
    assert payload["sms"].get("phone") == ("8613000000002" if version >= "2.180.0" else None)
    assert "sms_type" not in payload["sms"]


@pytest.mark.parametrize("version", ["2.158.0", "2.179.0", "2.180.0", "2.187.0"])
def test_mfa_challenge_shape(version: str) -> None:
    payload = mfa_challenge(version, factor_phone="8613200000000", otp="987654")
    user = payload["user"]
    assert user["phone"] == "" and user["email"] == "someone@example.com"
    assert [f["phone"] for f in user["factors"]] == ["8613200000000"]
    assert payload["sms"]["sms_type"] == "mfa"
    assert payload["sms"].get("phone") == ("8613200000000" if version >= "2.180.0" else None)
    with_phone = mfa_challenge(version, factor_phone="8613200000000", user_phone="8613012341234")
    assert with_phone["user"]["phone"] == "8613012341234"


def test_mfa_over_the_hook_starts_at_2_158() -> None:
    with pytest.raises(ValueError):
        mfa_challenge("2.157.0")


def test_send_sms_payload_keeps_given_user_and_metadata() -> None:
    user = make_user(id=USER_ID)
    metadata = make_metadata(uuid_=META_ID, time_="t")
    payload = send_sms_payload("2.190.0", user=user, otp="1", phone="8613999999999", metadata=metadata)
    assert payload == {"metadata": metadata, "user": user, "sms": {"otp": "1", "phone": "8613999999999"}}


# ---------------------------------------------------------------------------------------------------
# Signing


def test_sign_one_two_and_no_secrets() -> None:
    body, msg_id, ts = b'{"a":1}', "msg", 1_790_000_000

    def expected(secret: str) -> str:
        key = base64.b64decode(secret.removeprefix("v1,whsec_"))
        digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()

    assert sign([SECRET], msg_id, ts, body) == expected(SECRET)
    assert sign([SECRET, OTHER_SECRET], msg_id, ts, body) == f"{expected(SECRET)}, {expected(OTHER_SECRET)}"
    assert sign([], msg_id, ts, body) == ""
    # Go only trims "whsec_" if present.
    assert sign([SECRET.replace("whsec_", "")], msg_id, ts, body) == expected(SECRET)


def test_sign_refuses_what_gotrue_refuses() -> None:
    with pytest.raises(SigningError, match="^invalid signature format$"):
        sign([SECRET, "v1a,whpk_x:whsk_y"], "m", 1, b"")
    with pytest.raises(SigningError, match="^illegal base64 data at input byte 2$"):
        sign(["v1,whsec_ab-d"], "m", 1, b"")


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("", b""),
        ("QQ==", b"A"),
        ("QUI=", b"AB"),
        ("QUJD", b"ABC"),
        ("QU\nJD\r\n", b"ABC"),  # Go skips CR and LF
        ("QR==", b"A"),  # non-canonical trailing bits are accepted
        ("QQ", 0),
        ("QUJDQQ", 4),
        ("QQ=", 3),
        ("QQ=A", 2),
        ("Q===", 1),
        ("QQ==QQ==", 4),  # data after padding
        ("ab_d", 2),
        ("abé=", 2),
    ],
)
def test_go_base64_decode(text: str, result: bytes | int) -> None:
    if isinstance(result, bytes):
        assert go_base64_decode(text) == result
    else:
        with pytest.raises(SigningError, match=f"^illegal base64 data at input byte {result}$"):
            go_base64_decode(text)


def test_split_secrets_like_gotrue() -> None:
    assert split_secrets(f"|{SECRET}||{OTHER_SECRET}|") == [SECRET, OTHER_SECRET]
    assert split_secrets("") == []


# ---------------------------------------------------------------------------------------------------
# mime.ParseMediaType


@pytest.mark.parametrize(
    ("value", "result"),
    [
        ("application/json", "application/json"),
        ("Application/JSON ; charset=UTF-8", "application/json"),
        ('application/json; charset="utf-8"', "application/json"),
        ("application/json;", "application/json"),
        ("application/json; a=1; a=1", "application/json"),
        ("text", "text"),
        ("application/json; charset", "mime: invalid media parameter"),
        ("application/json; a=1; a=2", "mime: duplicate parameter name"),
        ("; charset=utf-8", "mime: no media type"),
        ("application json", "mime: expected slash after first token"),
        ("application/", "mime: expected token after slash"),
        ("application/json x", "mime: unexpected content after media subtype"),
    ],
)
def test_go_parse_media_type(value: str, result: str) -> None:
    if result.startswith("mime:"):
        with pytest.raises(ValueError, match=f"^{re.escape(result)}$"):
            go_parse_media_type(value)
    else:
        assert go_parse_media_type(value) == result


# ---------------------------------------------------------------------------------------------------
# The caller: the answer to each response, per version (reference §6, and the Go source)

COLUMNS = (
    ("2.164.0", "2.171.0"),
    ("2.172.0", "2.173.0"),
    ("2.174.0", "2.178.0"),
    ("2.179.0", "2.186.0"),
    ("2.187.0", "2.196.0"),
)
S = "success"
WRAP = (500, f"Error running hook URI: {URL}")
UNMARSHAL_SMS = (500, "Error unmarshaling Send SMS output.")
UNMARSHAL = (500, "Error unmarshaling JSON output.")
UNAVAILABLE = (500, "Service currently unavailable due to hook")
CT_MISSING = (400, "Invalid Content-Type: Missing Content-Type header")
JSON = (("content-type", "application/json"),)
Outcome = str | tuple[int, str]


def ct_wrong(value: str) -> tuple[int, str]:
    return (400, f"Invalid JSON response. Received content-type: {value}")


def unexpected(status: int) -> tuple[Outcome, ...]:
    return (WRAP, WRAP, *[(500, f"Unexpected status code returned from hook: {status}")] * 3)


def same(outcome: Outcome) -> tuple[Outcome, ...]:
    return (outcome,) * 5


BAD_JSON = (UNMARSHAL_SMS, WRAP, UNMARSHAL, UNMARSHAL, UNMARSHAL)
LIMIT = 204800
AT_LIMIT = b'{"p":"' + b"x" * (LIMIT - 8) + b'"}'


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    expected: tuple[Outcome, ...]  # per column of COLUMNS
    attempts: int = 1


TOO_MANY = (429, "Too many codes, retry in 60 s")
CASES = [
    Case("200 {}", 200, JSON, b"{}", same(S)),
    Case("200 {} charset", 200, (("content-type", "application/json; charset=utf-8"),), b'{"ok":1}', same(S)),
    Case("202 {}", 202, JSON, b"{}", same(S)),
    Case("200 null", 200, JSON, b"null", same(S)),
    Case(
        "200 error object",
        200,
        JSON,
        b'{"error":{"http_code":429,"message":"Too many codes, retry in 60 s"}}',
        (TOO_MANY, TOO_MANY, S, S, TOO_MANY),
    ),
    Case(
        "200 error message only",
        200,
        JSON,
        b'{"error":{"message":"boom"}}',
        ((500, "boom"), (500, "boom"), S, S, (500, "boom")),
    ),
    Case(
        "200 error http_code 0",
        200,
        JSON,
        b'{"error":{"http_code":0,"message":"x"}}',
        ((500, "x"), (500, "x"), S, S, (500, "x")),
    ),
    Case("200 error without message", 200, JSON, b'{"error":{"http_code":400}}', same(S)),
    Case("200 error empty message", 200, JSON, b'{"error":{"http_code":400,"message":""}}', same(S)),
    Case("200 error null", 200, JSON, b'{"error":null}', same(S)),
    Case("200 error string", 200, JSON, b'{"error":"text"}', (UNMARSHAL_SMS, WRAP, S, S, S)),
    Case(
        "200 error code string",
        200,
        JSON,
        b'{"error":{"http_code":"400","message":"x"}}',
        (UNMARSHAL_SMS, WRAP, S, S, S),
    ),
    Case(
        "200 error code float",
        200,
        JSON,
        b'{"error":{"http_code":400.0,"message":"x"}}',
        (UNMARSHAL_SMS, WRAP, S, S, S),
    ),
    Case(
        "200 error keys merge",
        200,
        JSON,
        b'{"error":{"message":"a"},"error":{"http_code":409}}',
        ((409, "a"), (409, "a"), S, S, (409, "a")),
    ),
    Case(
        "200 error then null",  # null resets hookserrors' pointer; the old value struct ignores it
        200,
        JSON,
        b'{"error":{"message":"a"},"error":null}',
        ((500, "a"), (500, "a"), S, S, S),
    ),
    Case(
        "200 error keys fold case",
        200,
        JSON,
        b'{"ERROR":{"Message":"x","HTTP_CODE":403}}',
        ((403, "x"), (403, "x"), S, S, (403, "x")),
    ),
    Case("204 no content-type", 204, (), b"", (WRAP, S, S, S, S)),
    Case("204 application/json", 204, JSON, b"", (UNMARSHAL_SMS, WRAP, UNMARSHAL, S, S)),
    Case("204 text/plain", 204, (("content-type", "text/plain"),), b"", (WRAP, WRAP, ct_wrong("text/plain"), S, S)),
    Case("200 empty body", 200, JSON, b"", BAD_JSON),
    Case("200 whitespace body", 200, JSON, b" \r\n", BAD_JSON),
    Case("200 array", 200, JSON, b"[]", BAD_JSON),
    Case("200 string", 200, JSON, b'"ok"', BAD_JSON),
    Case("200 number", 200, JSON, b"42", BAD_JSON),
    Case("200 [object Object]", 200, JSON, b"[object Object]", BAD_JSON),
    Case("200 NaN", 200, JSON, b"NaN", BAD_JSON),
    Case("200 BOM", 200, JSON, b"\xef\xbb\xbf{}", BAD_JSON),
    Case("200 trailing data", 200, JSON, b"{} {}", BAD_JSON),
    Case("200 gzip body", 200, (*JSON, ("content-encoding", "gzip")), gzip.compress(b"{}"), BAD_JSON),
    Case("200 no content-type", 200, (), b"{}", (WRAP, WRAP, CT_MISSING, CT_MISSING, CT_MISSING)),
    Case("200 text/plain", 200, (("content-type", "text/plain"),), b"{}", (WRAP, WRAP, *[ct_wrong("text/plain")] * 3)),
    Case(
        "200 problem+json",
        200,
        (("content-type", "application/problem+json"),),
        b"{}",
        (WRAP, WRAP, *[ct_wrong("application/problem+json")] * 3),
    ),
    Case(
        "200 bad media parameter",
        200,
        (("content-type", "application/json; charset"),),
        b"{}",
        (WRAP, WRAP, *[(400, "Invalid Content-Type header: mime: invalid media parameter")] * 3),
    ),
    Case("200 at size limit", 200, JSON, AT_LIMIT, same(S)),
    Case(
        "200 over size limit",
        200,
        JSON,
        AT_LIMIT + b" ",
        (WRAP, WRAP, *[(422, "Payload size exceeded size limit of 204800 bytes")] * 3),
    ),
    Case("429 without Retry-After", 429, JSON, b"{}", (WRAP, WRAP, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)),
    Case("503 without Retry-After", 503, (), b"", (WRAP, WRAP, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)),
    Case(
        "429 with Retry-After",
        429,
        (*JSON, ("retry-after", "60")),
        b'{"error":{"http_code":429,"message":"never read"}}',
        (UNMARSHAL_SMS, WRAP, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE),
        attempts=3,
    ),
    Case(
        "503 with Retry-After", 503, (("retry-after", "x"),), b"", (UNMARSHAL_SMS, WRAP, *[UNAVAILABLE] * 3), attempts=3
    ),
    Case(
        "400 with error object",
        400,
        JSON,
        b'{"error":{"http_code":400,"message":"bad phone"}}',
        (WRAP, WRAP, *[(500, "Invalid payload sent to hook")] * 3),
    ),
    Case(
        "401", 401, JSON, b'{"error":"unauthorized"}', (WRAP, WRAP, *[(500, "Hook requires authorization token")] * 3)
    ),
    Case("201", 201, JSON, b"{}", unexpected(201)),
    Case("302", 302, (("location", "http://elsewhere.test/"),), b"", unexpected(302)),
    Case("403", 403, JSON, b"{}", unexpected(403)),
    Case("500", 500, JSON, b'{"error":{"http_code":500,"message":"x"}}', unexpected(500)),
]


def outcomes_for(results: dict[str, HookResult]) -> dict[str, Outcome]:
    return {version: result.outcome for version, result in results.items()}


def expected_for(case: Case) -> dict[str, Outcome]:
    return {version: outcome for column, outcome in zip(COLUMNS, case.expected, strict=True) for version in column}


def mock_transport(case: Case, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        # A stream, so that a Content-Encoding body stays raw (see gotrue._raw_chunks).
        return httpx.Response(case.status, headers=list(case.headers), stream=httpx.ByteStream(case.body))

    return httpx.MockTransport(handler)


def starlette_app(case: Case, seen: list[tuple[list[tuple[bytes, bytes]], bytes]]) -> Starlette:
    async def hook(request: Request) -> Response:
        seen.append((list(request.headers.raw), await request.body()))
        return Response(case.body, status_code=case.status, headers=dict(case.headers))

    return Starlette(routes=[Route("/sms", hook, methods=["POST"])])


PAYLOAD = otp_login("2.186.0", otp="012345")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_version_table_with_handler_functions(case: Case) -> None:
    results = {}
    for version in expected_for(case):
        seen: list[httpx.Request] = []
        caller = GoTrueHookCaller(URL, SECRET, version=version, transport=mock_transport(case, seen), backoff=60)
        results[version] = caller.call(PAYLOAD)
        assert len(seen) == len(results[version].attempts) == case.attempts, version
    assert outcomes_for(results) == expected_for(case)
    for result in results.values():
        assert result.mfa_outcome == ("success" if result.ok else MFA_FAILURE)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_version_table_with_starlette_apps(case: Case) -> None:
    async def run_all() -> dict[str, HookResult]:
        results = {}
        for version in expected_for(case):
            seen: list[Any] = []
            # The ASGI transport ignores the host, so URL (which the wrapped message names) still works.
            transport = httpx.ASGITransport(app=starlette_app(case, seen))
            caller = GoTrueHookCaller(URL, SECRET, version=version, async_transport=transport)
            results[version] = await caller.call_async(PAYLOAD)
            assert len(seen) == case.attempts, version
        return results

    assert outcomes_for(asyncio.run(run_all())) == expected_for(case)


def test_error_codes_as_rendered_by_gotrue() -> None:
    def result(case: Case, version: str) -> HookResult:
        return GoTrueHookCaller(URL, SECRET, version=version, transport=mock_transport(case, [])).call(PAYLOAD)

    by_id = {c.id: c for c in CASES}
    assert result(by_id["200 error object"], "2.187.0").code == "unknown"
    assert result(by_id["200 error message only"], "2.187.0").code == "unexpected_failure"
    assert result(by_id["200 text/plain"], "2.186.0").code == "hook_payload_invalid_content_type"
    assert result(by_id["200 over size limit"], "2.186.0").code == "hook_payload_over_size_limit"
    assert result(by_id["400 with error object"], "2.186.0").code == "unexpected_failure"
    assert result(by_id["200 text/plain"], "2.171.0").code == "unexpected_failure"
    ok = result(by_id["200 {}"], "2.186.0")
    assert (ok.ok, ok.status, ok.message, ok.code) == (True, 200, None, None)


# ---------------------------------------------------------------------------------------------------
# The caller: requests, retries and the deadline


def recording_transport(
    replies: list[httpx.Response | Exception], seen: list[httpx.Request], times: list[float] | None = None
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if times is not None:
            times.append(time.monotonic())
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    return httpx.MockTransport(handler)


def ok() -> httpx.Response:
    return httpx.Response(200, json={})


def test_request_is_exactly_what_gotrue_sends() -> None:
    seen: list[httpx.Request] = []
    caller = GoTrueHookCaller(
        URL, f"{SECRET}|{OTHER_SECRET}", transport=recording_transport([ok()], seen), clock=lambda: 1_790_000_000.9
    )
    result = caller.call(PAYLOAD)
    assert result.outcome == "success"
    [request] = seen
    assert request.method == "POST" and str(request.url) == URL
    assert request.content == result.request_body == go_json(PAYLOAD)
    names = [name.decode() for name, _ in request.headers.raw]
    assert names == [
        "Host", "User-Agent", "Content-Length", "Accept-Encoding", "Content-Type",
        "Webhook-Id", "Webhook-Signature", "Webhook-Timestamp",
    ]  # fmt: skip
    headers = request.headers
    assert headers["user-agent"] == "Go-http-client/1.1" and headers["accept-encoding"] == "identity"
    assert headers["content-type"] == "application/json"
    assert headers["webhook-timestamp"] == "1790000000"
    assert uuid.UUID(headers["webhook-id"]).version == 4
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=, v1,[A-Za-z0-9+/]{43}=", headers["webhook-signature"])
    assert result.attempts[0].signature == headers["webhook-signature"]
    signed_at = datetime.fromtimestamp(1_790_000_000, tz=UTC)  # the clock, floored as GoTrue does
    assert Webhook(parse_secrets(OTHER_SECRET)[0]).sign(headers["webhook-id"], signed_at, request.content) in (
        headers["webhook-signature"].split(", ")
    )


def test_no_secret_sends_an_empty_signature() -> None:
    seen: list[httpx.Request] = []
    GoTrueHookCaller(URL, "", transport=recording_transport([ok()], seen)).call(PAYLOAD)
    assert seen[0].headers["webhook-signature"] == ""


def test_retries_keep_the_body_but_change_id_and_signature() -> None:
    seen: list[httpx.Request] = []
    busy = httpx.Response(503, headers={"Retry-After": "120"})
    caller = GoTrueHookCaller(URL, SECRET, transport=recording_transport([busy, busy, ok()], seen), backoff=60)
    started = time.monotonic()
    result = caller.call(PAYLOAD)
    assert time.monotonic() - started < 1  # retried at once: neither Retry-After nor backoff is waited
    assert result.outcome == "success" and len(seen) == len(result.attempts) == 3
    assert [a.status for a in result.attempts] == [503, 503, 200]
    assert len({r.content for r in seen}) == 1
    assert len({r.headers["webhook-id"] for r in seen}) == 3
    verifier = WebhookVerifier(parse_secrets(SECRET))
    for request in seen:
        verifier.verify(request.headers, request.content)


def test_transport_errors_back_off_then_give_up() -> None:
    seen: list[httpx.Request] = []
    times: list[float] = []
    refused = httpx.ConnectError("refused")
    for version, expected in [("2.186.0", (422, "Failed to reach hook after maximum retries")), ("2.173.0", WRAP)]:
        seen.clear()
        times.clear()
        transport = recording_transport([refused], seen, times)
        result = GoTrueHookCaller(URL, SECRET, version=version, transport=transport, backoff=0.1).call(PAYLOAD)
        assert result.outcome == expected
        assert len(seen) == 3 and [a.status for a in result.attempts] == [None, None, None]
        assert all(a.error and "refused" in a.error for a in result.attempts)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(0.09 <= gap < 0.5 for gap in gaps), gaps
    assert result.code == "unexpected_failure"


def test_transport_error_then_success() -> None:
    seen: list[httpx.Request] = []
    transport = recording_transport([httpx.ConnectError("refused"), ok()], seen)
    result = GoTrueHookCaller(URL, SECRET, transport=transport, backoff=0.01).call(PAYLOAD)
    assert result.outcome == "success" and len(result.attempts) == 2
    assert seen[0].content == seen[1].content
    assert seen[0].headers["webhook-id"] != seen[1].headers["webhook-id"]


def test_deadline_cuts_the_backoff_short() -> None:
    seen: list[httpx.Request] = []
    transport = recording_transport([httpx.ConnectError("refused")], seen)
    for backoff, attempts in [(0.2, 2), (1.0, 1)]:  # attempts at 0 and 0.2 s; or only at 0 s
        seen.clear()
        caller = GoTrueHookCaller(URL, SECRET, transport=transport, timeout=0.3, backoff=backoff)
        started = time.monotonic()
        result = caller.call(PAYLOAD)
        elapsed = time.monotonic() - started
        assert result.outcome == (422, "Failed to reach hook within maximum time of 0.300000 seconds")
        assert result.code == "hook_timeout"
        assert len(seen) == attempts and 0.28 <= elapsed < 0.8, (backoff, elapsed)


def test_a_slow_answer_is_a_timeout_without_retry() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        time.sleep(0.25)
        return ok()

    caller = GoTrueHookCaller(URL, SECRET, transport=httpx.MockTransport(slow), timeout=0.2)
    result = caller.call(PAYLOAD)
    assert result.outcome == (422, "Failed to reach hook within maximum time of 0.200000 seconds")
    assert len(result.attempts) == 1


def test_a_slow_asgi_app_is_cut_off_at_the_deadline() -> None:
    async def hook(request: Request) -> Response:
        await asyncio.sleep(5)
        return Response(b"{}", media_type="application/json")

    app = Starlette(routes=[Route("/sms", hook, methods=["POST"])])
    caller = GoTrueHookCaller.for_app(app, "/sms", SECRET, timeout=0.2)
    started = time.monotonic()
    result = caller.call(PAYLOAD)  # call() runs call_async in its own event loop
    assert time.monotonic() - started < 1
    assert result.outcome == (422, "Failed to reach hook within maximum time of 0.200000 seconds")


def test_redirects_are_not_followed() -> None:
    seen: list[httpx.Request] = []
    moved = httpx.Response(307, headers={"Location": "http://hook.test/elsewhere"})
    result = GoTrueHookCaller(URL, SECRET, transport=recording_transport([moved, ok()], seen)).call(PAYLOAD)
    assert result.outcome == (500, "Unexpected status code returned from hook: 307") and len(seen) == 1


@pytest.mark.parametrize(
    ("secrets", "message"),
    [
        ([SECRET, "v1a,whpk_abc:whsk_def"], "Error generating signatures: invalid signature format"),
        (["whsec_" + SECRET.removeprefix("v1,whsec_")], "Error generating signatures: invalid signature format"),
        ([SECRET.rstrip("=")], "Error generating signatures: illegal base64 data at input byte 40"),
    ],
)
def test_signing_failures_send_nothing(secrets: list[str], message: str) -> None:
    seen: list[httpx.Request] = []
    for version, expected in [("2.174.0", (500, message)), ("2.173.0", WRAP)]:
        caller = GoTrueHookCaller(URL, secrets, version=version, transport=recording_transport([ok()], seen))
        result = caller.call(PAYLOAD)
        assert result.outcome == expected and result.attempts == ()
    assert seen == []


def test_bytes_payload_is_sent_verbatim_and_defaults_are_gotrues() -> None:
    seen: list[httpx.Request] = []
    caller = GoTrueHookCaller(URL, SECRET, transport=recording_transport([ok()], seen))
    assert (caller.timeout, caller.backoff, caller.retries, caller.response_limit) == (5.0, 2.0, 3, 204800)
    assert caller.version == DEFAULT_VERSION == (2, 186, 0)
    caller.call(b"not even json")
    assert seen[0].content == b"not even json"


def test_versions_before_2_164_are_refused() -> None:
    with pytest.raises(ValueError, match="v2.164"):
        GoTrueHookCaller(URL, SECRET, version="2.163.0")
    assert GoTrueHookCaller(URL, SECRET, version="v2.164").version == (2, 164, 0)


# ---------------------------------------------------------------------------------------------------
# The caller over a real socket (uvicorn)


@pytest.fixture(scope="module")
def live_server() -> Iterator[tuple[str, list[list[tuple[bytes, bytes]]]]]:
    wire: list[list[tuple[bytes, bytes]]] = []

    async def ok_route(request: Request) -> Response:
        wire.append(list(request.scope["headers"]))
        await request.body()
        return Response(b"{}", media_type="application/json")

    async def slow_route(request: Request) -> Response:
        await asyncio.sleep(1)
        return Response(b"{}", media_type="application/json")

    app = Starlette(routes=[Route("/ok", ok_route, methods=["POST"]), Route("/slow", slow_route, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", ws="none", http="h11"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", wire
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_real_socket_headers_on_the_wire(live_server: tuple[str, list[list[tuple[bytes, bytes]]]]) -> None:
    base, wire = live_server
    wire.clear()
    result = GoTrueHookCaller(base + "/ok", SECRET).call(PAYLOAD)
    assert result.outcome == "success"
    [headers] = wire
    assert [name for name, _ in headers] == [
        b"host", b"user-agent", b"content-length", b"accept-encoding", b"content-type",
        b"webhook-id", b"webhook-signature", b"webhook-timestamp",
    ]  # fmt: skip
    WebhookVerifier(parse_secrets(SECRET)).verify({k.decode(): v.decode() for k, v in headers}, result.request_body)


def test_real_socket_async(live_server: tuple[str, list[list[tuple[bytes, bytes]]]]) -> None:
    base, _ = live_server
    result = asyncio.run(GoTrueHookCaller(base + "/ok", SECRET).call_async(PAYLOAD))
    assert result.outcome == "success"


def test_real_socket_slow_hook(live_server: tuple[str, list[list[tuple[bytes, bytes]]]]) -> None:
    base, _ = live_server
    started = time.monotonic()
    result = GoTrueHookCaller(base + "/slow", SECRET, timeout=0.3).call(PAYLOAD)
    assert time.monotonic() - started < 1.5
    assert result.outcome == (422, "Failed to reach hook within maximum time of 0.300000 seconds")
    assert len(result.attempts) == 1


def test_real_socket_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    result = GoTrueHookCaller(f"http://127.0.0.1:{port}/hook", SECRET, backoff=0.05).call(PAYLOAD)
    assert result.outcome == (422, "Failed to reach hook after maximum retries")
    assert len(result.attempts) == 3 and all(a.status is None for a in result.attempts)
