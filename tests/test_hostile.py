"""Hostile input (issue 6): fuzzing and attack scenarios against the Send SMS hook and the SQL code API.

Two halves:

* property-based fuzzing with Hypothesis: the hook's body, headers and signatures (the real app,
  driven in process with its lifespan run, against the real database and a fake Aliyun that counts
  every request), and the SQL functions' arguments through the PostgREST emulation;
* attack scenarios: SMS pumping, premium-rate pumping through the hook, enumeration, brute force,
  replays, retired secrets, oversized and slow-loris bodies, and timing of the code comparison.

Every property is stated from the outside: what status and body an attacker gets, and what reaches the
SMS provider or the outbox.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import re
import socket
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio.from_thread
import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings as fuzz_settings, strategies as st

from sidecar.app import create_app
from sidecar.config import AliyunConfig, Config, WorkerConfig
from sidecar.hook import MAX_BODY_BYTES
from sidecar.providers.aliyun import AliyunProvider
from sidecar.webhook import parse_secrets
from tests.support.aliyun import AK, AK_SECRET
from tests.support.builders import fresh_phone, without_send_limits
from tests.support.database import Database, drain_queue
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import (
    GoTrueHookCaller,
    HookResult,
    generate_secret,
    go_json,
    make_metadata,
    make_user,
    otp_login,
)
from tests.support.postgrest import SERVICE, Caller, PostgREST, Response, user
from tests.support.servers import run_app, sidecar_url

SECRET = generate_secret()  # the only secret the sidecars here are configured with
RETIRED = generate_secret()  # rotated out: GoTrue may still hold it, the sidecar no longer does
HOOK = "/hooks/send-sms"
NEW = (2, 196, 0)  # sends metadata, reads error objects
OLD = (2, 185, 0)  # no metadata: failures must be non-2xx statuses

# Everything that may answer a hostile request while the database and the provider are healthy:
# 200 ({} or an error object), 400, 401, 403 (a rate limit for old GoTrue), 413, and 500 as the
# deliberate answer for an OTP Aliyun cannot take. 502/503/504 mean an outage; none happens here.
FUZZ_STATUSES = {200, 400, 401, 403, 413, 500}
ERROR_CODES = {400, 401, 413, 429, 500}

FUZZ = dict(
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],  # no "explain": it costs seconds
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

SQL_METACHARACTERS = [
    "'",
    "''",
    '"',
    "\\",
    "%",
    "_",
    "$$",
    "$x$",
    ";",
    "--",
    "/*",
    "'; drop table sms.codes; --",
    "' or '1'='1",
    "') or true --",
    "'||(select code from sms.outbox limit 1)||'",
    "1); select pg_sleep(5); --",
    "E'\\x41'",
    "\\N",
    "null",
    "NULL",
    "{}",
    "[]",
    "%s",
    "%(phone)s",
    "{0}",
]
FULLWIDTH = str.maketrans("0123456789+", "０１２３４５６７８９＋")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
PURPOSE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


# --------------------------------------------------------------------------------------------------
# Sidecars: the real app in process (fast, any header bytes) and under uvicorn (raw sockets)


def sidecar_app(database: Database, fake: FakeAliyun, secrets: str = SECRET) -> Any:
    aliyun = AliyunConfig(
        access_key_id=AK, access_key_secret=AK_SECRET, sign_name="阿里云短信测试", template_code="SMS_154950909",
        intl_sign_name="Intl Sign", intl_template_code="SMS_200000001", endpoint=fake.endpoint, protocol="http",
    )  # fmt: skip
    # No delivery worker: the hook sends by itself, and the SQL tests here queue messages nobody must send.
    config = Config(database_url=sidecar_url(database), hook_secrets=parse_secrets(secrets), provider="aliyun",
                    aliyun=aliyun, worker=WorkerConfig(enabled=False))  # fmt: skip
    return create_app(config, AliyunProvider(aliyun))


class InProcess:
    """The app with its lifespan running in an event loop of its own thread; requests go through ASGI,
    so header bytes reach the app exactly as given (no HTTP parser in between)."""

    def __init__(self, app: Any, portal: anyio.from_thread.BlockingPortal) -> None:
        self.app = app
        self.portal = portal
        # raise_app_exceptions: a crash inside the app fails the test with its traceback.
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar.test")

    def post(self, body: Any, headers: Any, path: str = HOOK) -> httpx.Response:
        async def go() -> httpx.Response:
            return await self.client.post(path, content=body, headers=headers)

        return self.portal.call(go)

    def gotrue(self, payload: Any, version: tuple[int, int, int] = NEW, secrets: str = SECRET) -> HookResult:
        caller = GoTrueHookCaller.for_app(self.app, HOOK, secrets, version=version)
        return self.portal.call(caller.call_async, payload)


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeAliyun) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def hook(database: Database, fake: FakeAliyun) -> Iterator[InProcess]:
    drain_queue(database)
    app = sidecar_app(database, fake)
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            sidecar = InProcess(app, portal)
            try:
                yield sidecar
            finally:
                portal.call(sidecar.client.aclose)


@pytest.fixture(scope="module")
def served(database: Database, fake: FakeAliyun) -> Iterator[str]:
    """The same app under uvicorn, for what only a real socket can do."""
    drain_queue(database)
    with run_app(sidecar_app(database, fake)) as url:
        yield url


def hmac_b64(key: bytes, msg_id: bytes, timestamp: bytes, body: bytes) -> str:
    return base64.b64encode(hmac.new(key, msg_id + b"." + timestamp + b"." + body, hashlib.sha256).digest()).decode()


def signed(
    body: bytes, secret: str = SECRET, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    msg_id = msg_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    (key,) = parse_secrets(secret)
    signature = "v1," + hmac_b64(key, msg_id.encode(), ts.encode(), body)
    return {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": ts,
            "webhook-signature": signature}  # fmt: skip


def answer_kind(response: httpx.Response) -> str:
    """'success' for 200 {}, else 'error' after checking the body is the hook's JSON error object."""
    assert response.status_code in FUZZ_STATUSES, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    if response.status_code == 200 and body == {}:
        return "success"
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"http_code", "message"}, body
    assert isinstance(error["http_code"], int) and error["http_code"] in ERROR_CODES, body
    assert isinstance(error["message"], str) and error["message"], body
    if response.status_code != 200:  # old GoTrue gets the status itself; 403 stands for 429 there
        assert {403: 429}.get(response.status_code, response.status_code) == error["http_code"], body
    return "error"


def digits(text: str) -> str:
    return re.sub(r"[^0-9]", "", text)


def assert_plausible_send(sent: Any, body: bytes) -> None:
    """An SMS that went out: to a mainland number (the default allow-list) and with a code, both from the body."""
    text = body.decode(json.detect_encoding(body), "replace")  # json.loads reads UTF-16 and UTF-32 too
    assert re.fullmatch(r"1[3-9][0-9]{9}", sent.phone_numbers) and sent.template_code == "SMS_154950909", sent
    assert sent.phone_numbers[-8:] in digits(text), (sent, text)
    code = sent.template_param["code"]
    assert re.fullmatch(r"[0-9]{4,6}", code) and code in text, (sent, text)


# --------------------------------------------------------------------------------------------------
# Fuzzing the hook: headers and signatures


@dataclasses.dataclass(frozen=True)
class Forged:
    """A hook request as an attacker (or a broken proxy) might send it; built at send time."""

    body: bytes
    msg_id: bytes
    timestamp: int | bytes  # an offset from now in seconds, or raw header bytes
    mode: str  # how the signature header is made
    junk: tuple[bytes, ...]  # other tokens in the signature header
    separator: bytes
    duplicates: tuple[tuple[str, bytes | None], ...]  # repeated webhook-* headers: None = same value
    omit: frozenset[str]

    def build(self) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The headers, and whether the request is authentic (GoTrue's, signed with SECRET, fresh)."""
        now = int(time.time())
        ts = str(now + self.timestamp).encode() if isinstance(self.timestamp, int) else self.timestamp
        (key,) = parse_secrets(SECRET)
        good = hmac_b64(key, self.msg_id, ts, self.body)
        tokens = {
            "good": f"v1,{good}",
            "good-among-junk": f"v1,{good}",
            "good-trailing-comma": f"v1,{good},",
            "retired-key": "v1," + hmac_b64(parse_secrets(RETIRED)[0], self.msg_id, ts, self.body),
            "other-version": f"v2,{good}",
            "asymmetric-version": f"v1a,{good}",
            "upper-version": f"V1,{good}",
            "no-version": good,
            "unpadded": f"v1,{good.rstrip('=')}",
            "urlsafe": "v1," + good.replace("+", "-").replace("/", "_").rstrip("=") + "A",
            "truncated": f"v1,{good[:-4]}",
            "hex": "v1," + base64.b64decode(good).hex(),
            "comma-joined": f"v1,{good},v1,{good}",  # no whitespace: not how the spec separates them
            "over-other-body": "v1," + hmac_b64(key, self.msg_id, ts, self.body + b" "),
            "over-other-id": "v1," + hmac_b64(key, self.msg_id + b"x", ts, self.body),
            "empty": "",
            "junk-only": "",
        }
        token = tokens[self.mode].encode()
        half = len(self.junk) // 2
        if self.mode == "good-among-junk":
            signature = self.separator.join([*self.junk[:half], token, *self.junk[half:]])
        elif self.mode == "junk-only":
            signature = self.separator.join(self.junk)
        else:
            signature = token
        values = {"webhook-id": self.msg_id, "webhook-timestamp": ts, "webhook-signature": signature}
        headers = [(b"content-type", b"application/json")]
        headers += [(name.encode(), value) for name, value in values.items() if name not in self.omit]
        conflicting = False
        for name, value in self.duplicates:
            if name in self.omit:
                continue
            if value is None or value == values[name]:
                headers.append((name.encode(), values[name]))
            else:
                headers.append((name.encode(), value))
                conflicting = True
        fresh = isinstance(self.timestamp, int) and abs(self.timestamp) <= 250
        id_ok = 0 < len(self.msg_id) <= 8192 and all(0x20 <= b <= 0x7E for b in self.msg_id)
        authentic = (
            self.mode in GOOD_MODES
            and (self.mode != "good-among-junk" or self.separator in (b" ", b", "))
            and fresh
            and id_ok
            and len(signature) <= 8192
            and not conflicting
            and not self.omit
        )
        return headers, authentic


def otp_payloads(phones: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """GoTrue events of several versions, the number drawn from `phones`."""

    def build(version: tuple[int, int, int], phone: Any, otp: str, event: uuid.UUID) -> bytes:
        payload = otp_login(version, phone=str(phone), otp=otp, metadata=make_metadata(uuid_=str(event)))
        if "sms" in payload and "phone" in payload["sms"]:
            payload["sms"]["phone"] = phone
        return go_json(payload)

    return st.builds(
        build,
        st.sampled_from([(2, 140, 0), (2, 170, 0), OLD, NEW]),
        phones,
        st.from_regex(r"[0-9]{6}", fullmatch=True),
        st.uuids(version=4),
    )


# A mainland mobile number; Hypothesis picks the digits, so runs repeat.
mainland = st.integers(0, 10**9 - 1).map(lambda n: f"86139{n:09d}"[:13])
forged_bodies = st.one_of(otp_payloads(mainland), st.binary(max_size=300))
header_bytes = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8")),
    st.integers(8000, 20000).map(lambda n: b"A" * n),  # huge
    st.sampled_from([b"\r\n", b"\x00", b"\x7f", b"\xff\xfe", b"\t", b" ", b"", b"\x1b[31m"]),
)


GOOD_MODES = ["good", "good-among-junk"]
BAD_MODES = [
    "good-trailing-comma",  # GoTrue joins with ", " and never ends with a comma
    "retired-key",
    "other-version",
    "asymmetric-version",
    "upper-version",
    "no-version",
    "unpadded",
    "urlsafe",
    "truncated",
    "hex",
    "comma-joined",
    "over-other-body",
    "over-other-id",
    "empty",
]


@st.composite
def forged_requests(draw: st.DrawFn) -> Forged:
    msg_id = draw(
        st.one_of(
            st.uuids().map(lambda u: str(u).encode()),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=60).map(str.encode),
            header_bytes,
        )
    )
    timestamp = draw(
        st.one_of(
            st.integers(-250, 250),  # fresh
            st.integers(-(10**6), -301) | st.integers(301, 10**6),  # stale or from the future
            st.sampled_from(
                [b"", b"0", b"-5", b"+0", b" 0", b"1e9", b"1700000000.5", b"9" * 16, b"0x10", b"NaN", b"inf"]
            ),
            st.integers(0, 10**20).map(lambda n: str(n).translate(ARABIC_INDIC).encode()),  # unicode digits
            st.integers(0, 10**20).map(lambda n: str(n).translate(FULLWIDTH).encode()),
            header_bytes,
        )
    )
    mode = draw(st.sampled_from([*GOOD_MODES, *BAD_MODES, "junk-only"]))
    junk = tuple(
        draw(
            st.lists(
                st.one_of(
                    st.sampled_from([b"v1,", b"v1,A", b"v1,====", b"v2,abc", b"v1a,x", b",", b"v1,,"]),
                    st.binary(min_size=1, max_size=30).filter(lambda b: not b.isspace()),
                    st.integers(1, 200).map(lambda n: b"v1," + b"QUFB" * n),
                ),
                max_size=12,
            )
        )
    )
    separator = draw(st.sampled_from([b" ", b", ", b",", b"\t", b"  ", b";"]))
    duplicates = tuple(
        draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]),
                    st.none() | header_bytes,
                ),
                max_size=2,
            )
        )
    )
    omit = frozenset(
        draw(st.lists(st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]), max_size=2))
    )
    return Forged(draw(forged_bodies), msg_id, timestamp, mode, junk, separator, duplicates, omit)


@st.composite
def authentic_requests(draw: st.DrawFn) -> Forged:
    """What GoTrue itself sends (one or several signatures, retries repeating a header), so that the
    fuzzing also covers the requests that must get through."""
    return Forged(
        body=draw(forged_bodies),
        msg_id=str(draw(st.uuids())).encode(),
        timestamp=draw(st.integers(-250, 250)),
        mode=draw(st.sampled_from(GOOD_MODES)),
        junk=tuple(
            draw(st.lists(st.sampled_from([b"v1,", b"v1,AAAA", b"v2,abc", b"v1a,xyz", b"v1,QUFB"]), max_size=4))
        ),
        separator=draw(st.sampled_from([b" ", b", "])),
        duplicates=tuple(
            draw(st.lists(st.tuples(st.sampled_from(["webhook-id", "webhook-signature"]), st.none()), max_size=1))
        ),
        omit=frozenset(),
    )


@st.composite
def one_flaw_requests(draw: st.DrawFn) -> Forged:
    """GoTrue's request with exactly one thing wrong: each must be refused on its own."""
    good = draw(authentic_requests())
    flaw = draw(st.sampled_from(["stale", "future", "mode", "id", "omit", "conflict", "separator"]))
    if flaw == "stale":
        return dataclasses.replace(good, timestamp=draw(st.integers(-(10**9), -301)))
    if flaw == "future":
        return dataclasses.replace(good, timestamp=draw(st.integers(301, 10**9)))
    if flaw == "mode":
        return dataclasses.replace(good, mode=draw(st.sampled_from(BAD_MODES)))
    if flaw == "id":
        bad_id = draw(st.binary(min_size=1, max_size=40).filter(lambda b: any(c < 0x20 or c > 0x7E for c in b)))
        return dataclasses.replace(good, msg_id=draw(st.sampled_from([b"", b"A" * 8193, bad_id])))
    if flaw == "omit":
        names = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        return dataclasses.replace(good, omit=frozenset([draw(st.sampled_from(names))]))
    if flaw == "conflict":
        name = draw(st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]))
        return dataclasses.replace(good, duplicates=((name, b"0"),))
    junk = good.junk or (b"v1,AAAA",)
    return dataclasses.replace(good, mode="good-among-junk", junk=junk, separator=draw(st.sampled_from([b",", b";"])))


@fuzz_settings(max_examples=400, **FUZZ)
@given(forged=st.one_of(authentic_requests(), one_flaw_requests(), forged_requests()))
def test_fuzzed_headers_and_signatures(hook: InProcess, fake: FakeAliyun, forged: Forged) -> None:
    headers, authentic = forged.build()
    seen = fake.requests_seen
    response = hook.post(forged.body, headers)
    kind = answer_kind(response)
    event(f"authentic={authentic} status={response.status_code} {kind}")
    if not authentic:
        # Unsigned, badly signed, stale, replayed under another id, malformed headers: 401, nothing sent.
        assert response.status_code == 401, (response.status_code, response.text)
        assert fake.requests_seen == seen
        return
    assert response.status_code != 401, response.text
    if fake.requests_seen != seen:
        assert kind == "success"
        (sent,) = fake.sends[-1:]
        assert_plausible_send(sent, forged.body)


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


# --------------------------------------------------------------------------------------------------
# SMS pumping through the SQL API


def ask(api: PostgREST, phone: str, caller: Caller, purpose: str = "default") -> Response:
    return api.rpc("request_phone_code", {"phone": phone, "purpose": purpose}, caller)


def limits_hit(response: Response) -> list[str]:
    assert response.status == 429, response.body
    assert response.body["code"] == "over_sms_send_rate_limit"
    return list(json.loads(response.body["details"])["limits"])


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


# --------------------------------------------------------------------------------------------------
# Enumeration


def request(api: PostgREST, phone: str, caller: Caller, purpose: str = "default") -> str:
    response = ask(api, phone, caller, purpose)
    assert response.status == 200, response.body
    return str(response.body["request_id"])


def queued_code(database: Database, request_id: str) -> str:
    code: str = database.one("select code from sms.outbox where code_id = %s", [request_id])
    return code


def test_status_of_other_users_requests_looks_like_unknown_ids(api: PostgREST, settings: Any) -> None:
    without_send_limits(settings)
    alice, mallory = user(), user()
    alices = [request(api, fresh_phone(), alice) for _ in range(3)]
    backend = request(api, fresh_phone(), SERVICE)  # bound to no user
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
    rid = request(api, taken, alice)
    code = queued_code(database, rid)
    for guess in ("000000", "123456", code):
        on_taken = api.rpc("verify_phone_code", {"phone": taken, "code": guess}, mallory)
        on_empty = api.rpc("verify_phone_code", {"phone": empty, "code": guess}, mallory)
        assert (on_taken.status, on_taken.body, on_taken.headers) == (on_empty.status, on_empty.body, on_empty.headers)
        assert on_taken.body == {"valid": False, "reason": "not_found", "attempts_left": 0}
    assert database.one("select attempts from sms.codes where id = %s", [rid]) == 0


# --------------------------------------------------------------------------------------------------
# Brute force


def wrong(code: str, delta: int = 1) -> str:
    return f"{(int(code) + delta) % 10 ** len(code):0{len(code)}d}"


def verify(api: PostgREST, phone: str, code: str, caller: Caller, purpose: str = "default") -> Any:
    response = api.rpc("verify_phone_code", {"phone": phone, "code": code, "purpose": purpose}, caller)
    assert response.status == 200, response.body
    return response.body


def test_failures_are_counted_per_purpose_and_each_purpose_is_capped(
    api: PostgREST, database: Database, settings: Any
) -> None:
    without_send_limits(settings, max_attempts=3)
    alice, phone = user(), fresh_phone()
    login = queued_code(database, request(api, phone, alice, "login"))
    bind = queued_code(database, request(api, phone, alice, "bind_phone"))
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
    pay = queued_code(database, request(api, phone, alice, "pay"))
    for delta in (1, 2, 3):
        verify(api, phone, wrong(pay, delta), alice, "pay")
    assert verify(api, phone, pay, alice, "pay")["reason"] == "too_many_attempts"
    assert database.one("select max(attempts) from sms.codes where phone = %s", [phone]) == 3


def test_other_users_cannot_help_brute_force_a_code(api: PostgREST, database: Database, settings: Any) -> None:
    without_send_limits(settings, max_attempts=3)
    alice, phone = user(), fresh_phone()
    rid = request(api, phone, alice)
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


# --------------------------------------------------------------------------------------------------
# Replays, retired secrets, oversized and slow bodies


@pytest.mark.parametrize("version", [NEW, OLD], ids=["metadata", "no-metadata"])
def test_a_body_re_signed_under_new_ids_sends_one_sms(
    hook: InProcess, fake: FakeAliyun, version: tuple[int, int, int]
) -> None:
    body = go_json(otp_login(version, phone=fresh_phone()))
    answers = [hook.post(body, signed(body, timestamp=int(time.time()) - skew)) for skew in (0, 5, 120, 290, 0)]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {})] * 5
    assert len(fake.sends) == 1


def test_a_replay_six_minutes_later_is_refused(hook: InProcess, fake: FakeAliyun) -> None:
    body = go_json(otp_login(NEW, phone=fresh_phone()))
    headers = signed(body)
    assert hook.post(body, headers).json() == {}
    assert hook.post(body, headers).json() == {}  # within the window: the same event, not sent again
    # The same request as captured six minutes ago (the verifier reads the wall clock itself).
    captured = signed(body, timestamp=int(time.time()) - 360)
    replay = hook.post(body, captured)
    assert replay.status_code == 401 and answer_kind(replay) == "error"
    # Nor does a fresh body with a stolen old signature pass, under a current timestamp.
    other = go_json(otp_login(NEW, phone=fresh_phone()))
    assert hook.post(other, {**captured, "webhook-timestamp": str(int(time.time()))}).status_code == 401
    assert len(fake.sends) == 1


def test_a_rotated_out_secret_is_refused(hook: InProcess, fake: FakeAliyun) -> None:
    result = hook.gotrue(otp_login(NEW, phone=fresh_phone()), secrets=RETIRED)
    assert [a.status for a in result.attempts] == [401] and result.outcome != "success"
    body = go_json(otp_login(OLD, phone=fresh_phone()))
    assert hook.post(body, signed(body, secret=RETIRED)).status_code == 401
    assert fake.requests_seen == 0
    # During a rotation GoTrue signs with both; the current one is enough.
    assert hook.gotrue(otp_login(NEW, phone=fresh_phone()), secrets=f"{RETIRED}|{SECRET}").outcome == "success"
    assert len(fake.sends) == 1


def test_oversized_bodies_are_refused_before_anything_is_sent(hook: InProcess, fake: FakeAliyun) -> None:
    payload = otp_login(NEW, phone=fresh_phone())
    payload["user"]["user_metadata"] = {"pad": "x" * MAX_BODY_BYTES}
    big = go_json(payload)
    assert hook.post(big, signed(big)).status_code == 413  # signed by GoTrue, still too big

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b" " * 8192

    assert hook.post(chunks(), signed(b" " * 8192 * 20)).status_code == 413
    small = go_json(otp_login(NEW, phone=fresh_phone()))
    lying = [(k.encode(), v.encode()) for k, v in signed(small).items()] + [(b"content-length", b"99999999999")]
    assert hook.post(small, lying).status_code == 413
    assert fake.requests_seen == 0


def raw_exchange(url: str, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int | None, bytes, float]:
    """Send bytes on a fresh connection; the status (None if closed without one), the reply and the time."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        data = b""
        try:
            sock.sendall(head + body)  # the server may answer and close before it has read everything
        except OSError:
            pass
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    elapsed = time.monotonic() - started
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(match[1]) if match else None), data, elapsed


def test_malformed_http_is_refused_and_the_server_stays_up(served: str, fake: FakeAliyun) -> None:
    body = go_json(otp_login(OLD, phone=fresh_phone()))
    good = "".join(f"{k}: {v}\r\n" for k, v in signed(body).items()).encode()
    heads = [
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nwebhook-id: a\x00b\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nX-Big: " + b"A" * 100_000 + b"\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 5000 + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"
        + good + b"\r\nffffffffffffffffff\r\n",
    ]  # fmt: skip
    for head in heads:
        status, reply, elapsed = raw_exchange(served, head)
        assert status is None or 400 <= status < 500, reply[:200]
        assert elapsed < 5
    assert httpx.get(served + "/healthz", timeout=5).status_code == 200
    assert fake.requests_seen == 0


def test_slow_loris_bodies_are_cut_off_and_others_are_served(served: str, fake: FakeAliyun) -> None:
    declared = 60_000  # under the size limit, so only the time limit can stop it
    intended = b'{"pad": "' + b"x" * (declared - 11) + b'"}'
    assert len(intended) == declared
    results: list[tuple[int | None, float, int]] = []
    host, port = served.removeprefix("http://").split(":")

    def trickle() -> None:
        headers = "".join(f"{k}: {v}\r\n" for k, v in signed(intended).items())
        head = f"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n{headers}\r\n".encode()
        started = time.monotonic()
        sent, reply = 0, b""
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head)
            sock.settimeout(0.25)
            while time.monotonic() - started < 15:
                try:
                    sock.sendall(intended[sent : sent + 1])
                    sent += 1
                except OSError:
                    break
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                reply += chunk
                if not chunk or b"\r\n\r\n" in reply:
                    break
        match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
        results.append((int(match[1]) if match else None, time.monotonic() - started, sent))

    lorises = [threading.Thread(target=trickle) for _ in range(12)]
    for t in lorises:
        t.start()
    time.sleep(0.5)
    # Meanwhile, everyone else is served promptly, GoTrue included.
    started = time.monotonic()
    assert httpx.get(served + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 1
    phone = fresh_phone()
    started = time.monotonic()
    result = GoTrueHookCaller(served + HOOK, SECRET, version=NEW).call(otp_login(NEW, phone=phone))
    assert result.outcome == "success" and time.monotonic() - started < 3
    for t in lorises:
        t.join(20)
    assert len(results) == 12
    for status, elapsed, sent in results:
        assert status in (408, None), results  # answered with the slow-body error, or cut off
        assert elapsed < 4, results
        assert sent < declared
    assert [s.phone_numbers for s in fake.sends] == [phone[2:]]


# --------------------------------------------------------------------------------------------------
# Timing


def test_codes_are_compared_in_constant_time(database: Database) -> None:
    check = database.one("select pg_get_functiondef('sms._check_code(text, text, text, text)'::regprocedure)")
    compact = re.sub(r"\s+", " ", check)
    assert "sms._constant_time_equal(sms._hash_code(c.id, p_code), c.code_hash)" in compact
    assert not re.search(r"code_hash\s*(=|<>|!=)|(=|<>|!=)\s*c\.code_hash", check), "a direct comparison of hashes"
    for wrapper in ("sms.verify_code(text, text, text)", "sms.grpc_verify_code(text, text)"):
        assert "sms._check_code(" in database.one("select pg_get_functiondef(%s::regprocedure)", [wrapper])
    equal = database.one("select pg_get_functiondef('sms._constant_time_equal(bytea, bytea)'::regprocedure)").lower()
    body = equal.split("begin", 1)[1]
    assert "exit" not in body and body.count("return") == 1, "the comparison stops early"

    # It is right ...
    cases = {
        ("\\x0102", "\\x0102"): True,
        ("\\x0102", "\\x0103"): False,
        ("\\x0102", "\\x0202"): False,
        ("\\x0102", "\\x010203"): False,
        ("\\x", "\\x"): True,
        ("\\x", "\\x00"): False,
    }
    for (a, b), expected in cases.items():
        assert database.one("select sms._constant_time_equal(%s::bytea, %s::bytea)", [a, b]) is expected

    # ... and takes as long for a difference in the first byte as in the last (a smoke check, measured
    # inside the server to keep the network and the client's scheduling out of it).
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute(
            "create function pg_temp.time_equal(a bytea, b bytea, n integer) returns float8 language plpgsql as $$"
            " declare t0 timestamptz := clock_timestamp(); r boolean;"
            " begin for i in 1 .. n loop r := sms._constant_time_equal(a, b); end loop;"
            " return extract(epoch from clock_timestamp() - t0); end $$"
        )
        hashes = conn.execute("select extensions.hmac('x', 'k', 'sha256')").fetchone()
        assert hashes is not None
        real = bytes(hashes[0])
        first = bytes([real[0] ^ 1]) + real[1:]
        last = real[:-1] + bytes([real[-1] ^ 1])
        timings: dict[str, list[float]] = {"first": [], "last": []}
        for i in range(15):
            order = [("first", first), ("last", last)] if i % 2 else [("last", last), ("first", first)]
            for name, other in order:
                row = conn.execute("select pg_temp.time_equal(%s, %s, 3000)", [real, other]).fetchone()
                assert row is not None
                timings[name].append(row[0])
    ratio = statistics.median(timings["first"]) / statistics.median(timings["last"])
    # An early exit at the first differing byte measures about 0.15 here.
    assert 0.5 < ratio < 2.0, (ratio, timings)
