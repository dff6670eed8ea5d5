"""Hostile input: fuzzing the hook: headers and signatures."""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid
from typing import Any

from hypothesis import event, given, settings as fuzz_settings, strategies as st

from sidecar.webhook import parse_secrets
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import (
    go_json,
    make_metadata,
    otp_login,
)
from tests.support.hostile import (
    ARABIC_INDIC,
    FULLWIDTH,
    FUZZ,
    NEW,
    OLD,
    RETIRED,
    SECRET,
    InProcess,
    answer_kind,
    assert_plausible_send,
    hmac_b64,
    mainland,
)

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
