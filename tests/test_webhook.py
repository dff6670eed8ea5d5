"""sidecar.webhook: secrets parsing and verification of GoTrue's Standard Webhooks signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from standardwebhooks.webhooks import Webhook
from starlette.datastructures import Headers

from sidecar.webhook import WebhookSecretError, WebhookVerificationError, WebhookVerifier, parse_secrets
from tests.support.gotrue import generate_secret, go_base64_decode, go_json, otp_login, sign

# The library reads the wall clock itself, so timestamps are relative to it; offsets stay 10 s clear
# of the ±300 s bounds so that a slow machine cannot move an example across one.
NOW = 1_790_000_000  # a fixed moment, for signing only
BODY = b'{"user":{"id":"x","phone":"8613012341234"},"sms":{"otp":"012345","phone":"8613012341234"}}'


def secret_for(key: bytes) -> str:
    return "v1,whsec_" + base64.b64encode(key).decode()


KEY_A, KEY_B, KEY_C = (bytes([n]) * 32 for n in (1, 2, 3))
SECRET_A, SECRET_B, SECRET_C = (secret_for(k) for k in (KEY_A, KEY_B, KEY_C))


def now() -> int:
    return int(time.time())


def gotrue_headers(
    secrets: list[str], body: bytes = BODY, timestamp: int | None = None, msg_id: str | None = None
) -> dict[str, str]:
    """The headers GoTrue sends, with Go's canonical header names; the timestamp defaults to now."""
    msg_id = msg_id or str(uuid.uuid4())
    timestamp = now() if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "Webhook-Id": msg_id,
        "Webhook-Timestamp": str(timestamp),
        "Webhook-Signature": sign(secrets, msg_id, timestamp, body),
    }


def reason_of(verifier: WebhookVerifier, headers: dict[str, str], body: bytes = BODY) -> str:
    with pytest.raises(WebhookVerificationError) as caught:
        verifier.verify(headers, body)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


# ---------------------------------------------------------------------------------------------------
# parse_secrets


def test_parse_one_secret() -> None:
    assert parse_secrets(SECRET_A) == (KEY_A,)


def test_parse_generated_secret_matches_gotrue_decoding() -> None:
    secret = generate_secret()
    assert parse_secrets(secret) == (go_base64_decode(secret.removeprefix("v1,whsec_")),)


def test_parse_several_secrets_keeps_order_and_drops_empty_parts() -> None:
    assert parse_secrets(f"|{SECRET_B}||{SECRET_A}|") == (KEY_B, KEY_A)
    assert parse_secrets(f"{SECRET_A}|{SECRET_B}|{SECRET_C}") == (KEY_A, KEY_B, KEY_C)


def test_parse_ignores_whitespace_around_items() -> None:
    assert parse_secrets(f" {SECRET_A} | \n{SECRET_B}\n") == (KEY_A, KEY_B)


@pytest.mark.parametrize("value", ["", "|", "||||", "  ", " | \n| "])
def test_parse_refuses_an_empty_list(value: str) -> None:
    with pytest.raises(WebhookSecretError, match="no webhook secret"):
        parse_secrets(value)


ENCODED = base64.b64encode(bytes(range(200, 232))).decode()  # has '+' and '/' in it
URLSAFE = base64.urlsafe_b64encode(bytes(range(200, 232))).decode()


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (f"v2,whsec_{ENCODED}", "does not start with 'v1,'"),
        (f"whsec_{ENCODED}", "does not start with 'v1,'"),
        (f"V1,whsec_{ENCODED}", "does not start with 'v1,'"),
        (f"v1,{ENCODED}", "lacks 'whsec_'"),
        (f"v1,WHSEC_{ENCODED}", "lacks 'whsec_'"),
        (f"v1,whsec_{ENCODED.rstrip('=')}", "padded standard base64"),
        (f"v1,whsec_{URLSAFE}", "padded standard base64"),
        (f"v1,whsec_{ENCODED[:20]}!!{ENCODED[22:]}", "padded standard base64"),
        (f"v1,whsec_{ENCODED[:20]}é{ENCODED[21:]}", "padded standard base64"),
        (f"v1,whsec_{ENCODED}{ENCODED}", "padded standard base64"),  # data after padding
        ("v1,whsec_c2hvcnQ=", "too short"),
        (f"v1a,whpk_{ENCODED}:whsk_{ENCODED}", "asymmetric 'v1a,' secret: GoTrue cannot sign"),
    ],
)
def test_parse_refuses_malformed_secrets_without_revealing_them(item: str, expected: str) -> None:
    assert URLSAFE != ENCODED  # the fixture really differs between the two alphabets
    with pytest.raises(WebhookSecretError) as caught:
        parse_secrets(f"{SECRET_A}|{item}")
    message = str(caught.value)
    assert message.startswith("secret #2 ")
    assert expected in message
    material = item.split("_")[-1] if "_" in item else item.split(",")[-1]
    assert item not in message and material[:8] not in message and material[-8:] not in message
    assert ENCODED[:8] not in message and URLSAFE[:8] not in message and SECRET_A[9:17] not in message
    # No chained binascii error either.
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_parse_secret_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_secrets("v1,nope")


# ---------------------------------------------------------------------------------------------------
# verify: what GoTrue sends


@pytest.mark.parametrize("count", [1, 2, 3])
def test_accepts_gotrue_headers_whichever_signature_matches(count: int) -> None:
    others = [secret_for(bytes([100 + n]) * 32) for n in range(count - 1)]
    for position in range(count):
        gotrue_secrets = others[:position] + [SECRET_B] + others[position:]
        headers = gotrue_headers(gotrue_secrets)
        assert headers["Webhook-Signature"].count(", v1,") == count - 1
        WebhookVerifier((KEY_B,)).verify(headers, BODY)


@pytest.mark.parametrize(
    ("gotrue_secrets", "sidecar_keys"),
    [
        ([SECRET_A], (KEY_A, KEY_B)),  # sidecar already knows the new key, GoTrue still signs with the old
        ([SECRET_B], (KEY_A, KEY_B)),  # GoTrue switched, the sidecar still knows the old key too
        ([SECRET_A, SECRET_B], (KEY_B,)),  # GoTrue signs with both, the sidecar dropped the old key
        ([SECRET_A, SECRET_B], (KEY_A,)),  # ... or has not learnt the new one yet
        ([SECRET_B, SECRET_A], (KEY_C, KEY_A)),
        ([SECRET_C], (KEY_A, KEY_B, KEY_C)),
    ],
)
def test_accepts_during_key_rotation(gotrue_secrets: list[str], sidecar_keys: tuple[bytes, ...]) -> None:
    WebhookVerifier(sidecar_keys).verify(gotrue_headers(gotrue_secrets), BODY)


def test_accepts_gotrue_emulator_request_bytes() -> None:
    encoded = go_json(otp_login("2.187.0", otp="000123"))
    WebhookVerifier((KEY_A,)).verify(gotrue_headers([SECRET_A], encoded), encoded)


@pytest.mark.parametrize(
    "gotrue_secrets", [[SECRET_A], [SECRET_A, SECRET_C], [SECRET_C, SECRET_A, secret_for(b"x" * 32)]]
)
def test_rejects_signatures_from_unknown_keys(gotrue_secrets: list[str]) -> None:
    verifier = WebhookVerifier((KEY_B,))
    assert reason_of(verifier, gotrue_headers(gotrue_secrets)) == "no matching signature"


def test_rejects_tampered_body() -> None:
    verifier = WebhookVerifier((KEY_A,))
    headers = gotrue_headers([SECRET_A])
    for tampered in (BODY + b"\n", BODY[:-1], BODY.replace(b"012345", b"012346"), b" " + BODY, b""):
        assert reason_of(verifier, headers, tampered) == "no matching signature"


def test_rejects_tampered_id_and_timestamp() -> None:
    verifier = WebhookVerifier((KEY_A,))
    headers = gotrue_headers([SECRET_A])
    verifier.verify(headers, BODY)
    sent = int(headers["Webhook-Timestamp"])
    assert reason_of(verifier, {**headers, "Webhook-Id": str(uuid.uuid4())}) == "no matching signature"
    assert reason_of(verifier, {**headers, "Webhook-Timestamp": str(sent + 1)}) == "no matching signature"


def test_signature_is_bound_to_its_own_key_not_a_prefix() -> None:
    # A key that is a prefix of another must not verify the other's signatures.
    verifier = WebhookVerifier((KEY_A[:16],))
    assert reason_of(verifier, gotrue_headers([SECRET_A])) == "no matching signature"


# ---------------------------------------------------------------------------------------------------
# verify: the timestamp window (±5 minutes around the wall clock)


@pytest.mark.parametrize("offset", [-290, -60, -1, 0, 1, 60, 290])
def test_accepts_timestamps_within_five_minutes(offset: int) -> None:
    WebhookVerifier((KEY_A,)).verify(gotrue_headers([SECRET_A], timestamp=now() + offset), BODY)


@pytest.mark.parametrize(
    ("offset", "reason"),
    [(-310, "stale timestamp"), (-86_400, "stale timestamp"), (310, "timestamp in the future")],
)
def test_rejects_timestamps_outside_five_minutes(offset: int, reason: str) -> None:
    verifier = WebhookVerifier((KEY_A,))
    assert reason_of(verifier, gotrue_headers([SECRET_A], timestamp=now() + offset)) == reason


def test_a_signature_older_than_five_minutes_is_refused_even_with_every_key() -> None:
    headers = gotrue_headers([SECRET_A, SECRET_B], timestamp=now() - 400)
    assert reason_of(WebhookVerifier((KEY_A, KEY_B)), headers) == "stale timestamp"


# ---------------------------------------------------------------------------------------------------
# verify: header names and forms


def test_header_names_are_case_insensitive() -> None:
    verifier = WebhookVerifier((KEY_A,))
    headers = gotrue_headers([SECRET_A])
    verifier.verify({k.lower(): v for k, v in headers.items()}, BODY)  # HTTP/2
    verifier.verify({k.upper(): v for k, v in headers.items()}, BODY)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    verifier.verify(Headers(raw=raw), BODY)  # what a Starlette request has


@pytest.mark.parametrize("name", ["Webhook-Id", "Webhook-Timestamp", "Webhook-Signature"])
def test_rejects_missing_or_empty_headers(name: str) -> None:
    verifier = WebhookVerifier((KEY_A,))
    headers = gotrue_headers([SECRET_A])
    without = {k: v for k, v in headers.items() if k != name}
    assert reason_of(verifier, without) == "missing headers"
    assert reason_of(verifier, {**headers, name: ""}) == "missing headers"


def test_rejects_gotrue_without_secrets() -> None:
    # GoTrue with no secret configured sends an empty webhook-signature.
    headers = gotrue_headers([])
    assert headers["Webhook-Signature"] == ""
    assert reason_of(WebhookVerifier((KEY_A,)), headers) == "missing headers"


def test_rejects_conflicting_duplicate_headers() -> None:
    verifier = WebhookVerifier((KEY_A,))
    headers = gotrue_headers([SECRET_A])
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    duplicated = Headers(raw=[*raw, (b"webhook-signature", b"v1,AAAA")])
    assert reason_of(verifier, duplicated) == "malformed headers"
    # The same value twice is not ambiguous.
    verifier.verify(Headers(raw=[*raw, raw[-1]]), BODY)


VALID = "<valid>"


@pytest.mark.parametrize(
    "template",
    [
        "<valid>",
        "v1,AAAA, <valid>",  # GoTrue's join, first token from another key
        "<valid>, v1,BBBB",
        "v1,A <valid>",  # the standard's single-space join; bad padding before the match is harmless
        "v1,!!!!, <valid>",
        "v1 <valid>",  # a token without a comma
        "v2,xyz, <valid>",  # other versions never match, the v1 token still does
        "v1a,abc:def <valid>",
    ],
)
def test_accepts_signature_header_variants(template: str) -> None:
    headers = gotrue_headers([SECRET_A])
    signature = headers["Webhook-Signature"]
    headers["Webhook-Signature"] = template.replace(VALID, signature)
    WebhookVerifier((KEY_A,)).verify(headers, BODY)


@pytest.mark.parametrize(
    "template",
    [
        "v1",
        ",",
        "v1,",
        "garbage",
        "v2,<sig>",  # right signature, wrong version
        "V1,<sig>",
        "v1;<sig>",
        "<sig>",  # no version at all
        "v1,<sig-unpadded>",  # GoTrue always pads
        "v1,<sig-urlsafe>",
        "v1,<sig>v1,<sig>",  # no separator: one malformed token
        "v1,<sig-as-hex>",
        "v1,<sig>,v1,<sig>",  # neither GoTrue's ", " nor a space: one token
        "v1,<sig>,",  # a trailing comma is not GoTrue's
        "v1,é<sig>",
    ],
)
def test_rejects_signature_header_garbage(template: str) -> None:
    # An id whose signature has both '+' and '/', so that the URL-safe form really differs.
    headers = next(
        h
        for h in (gotrue_headers([SECRET_A], msg_id=f"msg_{n}") for n in range(1000))
        if "+" in h["Webhook-Signature"] and "/" in h["Webhook-Signature"]
    )
    signature = headers["Webhook-Signature"].removeprefix("v1,")
    digest = base64.b64decode(signature)
    replaced = (
        template.replace("<sig-unpadded>", signature.rstrip("="))
        .replace("<sig-urlsafe>", base64.urlsafe_b64encode(digest).decode())
        .replace("<sig-as-hex>", digest.hex())
        .replace("<sig>", signature)
    )
    headers["Webhook-Signature"] = replaced
    assert reason_of(WebhookVerifier((KEY_A,)), headers) == "no matching signature"


@pytest.mark.parametrize(
    "timestamp", ["abc", "1.79e9", "<now+1>", "<now-1>", "１７９", "nan", "inf", "-inf", "9" * 16, "0x10", "1e400"]
)
def test_a_signature_verifies_under_no_other_timestamp(timestamp: str) -> None:
    # Texts that denote the signed second ("<now>.0", "+<now>") verify: the library reads the header
    # with float() and signs floor(). That gives nothing away: the second, and so the window, is the same.
    msg_id, sent = str(uuid.uuid4()), now()
    text = timestamp.replace("<now+1>", str(sent + 1)).replace("<now-1>", str(sent - 1))
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": text,
        "webhook-signature": sign([SECRET_A], msg_id, sent, BODY),
    }
    reason = reason_of(WebhookVerifier((KEY_A,)), headers)
    assert reason in {"malformed timestamp", "malformed headers", "stale timestamp", "timestamp in the future",
                      "no matching signature"}  # fmt: skip


def test_rejects_oversized_headers() -> None:
    headers = gotrue_headers([SECRET_A])
    headers["Webhook-Signature"] = ("v1,AAAA " * 2000) + headers["Webhook-Signature"]
    assert reason_of(WebhookVerifier((KEY_A,)), headers) == "oversized headers"


@pytest.mark.parametrize("msg_id", ["idé", "id\x00x", "id\nx", "标识"])
def test_rejects_non_ascii_or_control_ids(msg_id: str) -> None:
    headers = {**gotrue_headers([SECRET_A]), "Webhook-Id": msg_id}
    assert reason_of(WebhookVerifier((KEY_A,)), headers) == "malformed webhook-id"


def test_signature_covers_raw_bytes_even_if_not_utf8() -> None:
    body = b"\xff\xfe{}"
    verifier = WebhookVerifier((KEY_A,))
    verifier.verify(gotrue_headers([SECRET_A], body), body)
    assert reason_of(verifier, gotrue_headers([SECRET_A], BODY), body) == "no matching signature"


def test_reasons_never_echo_inputs() -> None:
    verifier = WebhookVerifier((KEY_A,))
    secret_looking = "v1,SECRETSIGNATUREVALUE="
    cases = [
        {"Webhook-Id": "ID-VALUE-123", "Webhook-Timestamp": "TS-VALUE", "Webhook-Signature": secret_looking},
        {"Webhook-Id": "ID-VALUE-123", "Webhook-Timestamp": str(now()), "Webhook-Signature": secret_looking},
        {"Webhook-Id": "ID-VALUE-123", "Webhook-Timestamp": "1", "Webhook-Signature": secret_looking},
    ]
    for headers in cases:
        reason = reason_of(verifier, headers, b"BODY-VALUE")
        for value in ("ID-VALUE", "TS-VALUE", "SECRETSIGNATURE", "BODY-VALUE"):
            assert value not in reason


def test_verifier_requires_keys() -> None:
    with pytest.raises(ValueError):
        WebhookVerifier(())
    with pytest.raises(ValueError):
        WebhookVerifier((b"",))


# ---------------------------------------------------------------------------------------------------
# Cross-checks against the standardwebhooks library (an independent implementation)


def test_emulator_sign_matches_the_library() -> None:
    msg_id, body = str(uuid.uuid4()), '{"otp":"012345","x":"中文 \\u003c"}'.encode()
    library = Webhook(KEY_A).sign(msg_id, datetime.fromtimestamp(NOW, tz=UTC), body.decode())
    assert sign([SECRET_A], msg_id, NOW, body) == library
    # The library's own way of reading "whsec_..." (without GoTrue's "v1,") agrees too.
    moment = datetime.fromtimestamp(NOW, tz=UTC)
    assert Webhook(SECRET_A.removeprefix("v1,")).sign(msg_id, moment, body.decode()) == library
    assert sign([SECRET_A], msg_id, NOW, body) == (
        "v1," + base64.b64encode(hmac.new(KEY_A, f"{msg_id}.{NOW}.".encode() + body, hashlib.sha256).digest()).decode()
    )


def test_verifier_accepts_what_the_library_signs_and_the_library_accepts_gotrue_single_secret() -> None:
    msg_id, current = str(uuid.uuid4()), int(time.time())
    library_signature = Webhook(KEY_A).sign(msg_id, datetime.fromtimestamp(current, tz=UTC), BODY.decode())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(current), "webhook-signature": library_signature}
    WebhookVerifier((KEY_A,)).verify(headers, BODY)
    Webhook(KEY_A).verify(BODY, gotrue_headers([SECRET_A], timestamp=current), json_parse=False)


def test_gotrues_multi_secret_header_verifies_for_each_of_its_keys() -> None:
    # GoTrue joins with ", " (reference §4); the library splits on " ". Either key alone verifies.
    headers = gotrue_headers([SECRET_A, SECRET_B])
    assert ", v1," in headers["Webhook-Signature"]
    WebhookVerifier((KEY_A,)).verify(headers, BODY)
    WebhookVerifier((KEY_B,)).verify(headers, BODY)
    assert reason_of(WebhookVerifier((KEY_C,)), headers) == "no matching signature"


# ---------------------------------------------------------------------------------------------------
# Properties

HEADER_NAMES = st.sampled_from(
    ["webhook-id", "Webhook-Id", "webhook-timestamp", "WEBHOOK-TIMESTAMP", "webhook-signature", "Webhook-Signature"]
)
SIGNATURE_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.tuples(
            st.sampled_from(["v1", "v2", "v1a", "", "V1"]),
            st.sampled_from([",", "", ",,"]),
            st.one_of(st.text(max_size=50), st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())),
        ).map("".join),
        max_size=6,
    ).map(lambda tokens: ", ".join(tokens)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(
    headers=st.dictionaries(
        st.one_of(HEADER_NAMES, st.text(max_size=20)),
        st.one_of(SIGNATURE_TEXT, st.integers(0, 2 * NOW).map(str), st.floats().map(str), st.text(max_size=40)),
        max_size=8,
    ),
    body=st.binary(max_size=300),
)
def test_arbitrary_input_only_raises_verification_errors(headers: dict[str, str], body: bytes) -> None:
    verifier = WebhookVerifier((KEY_A, KEY_B))
    try:
        verifier.verify(headers, body)
    except WebhookVerificationError as exc:
        assert exc.reason in {
            "missing headers",
            "malformed headers",
            "oversized headers",
            "malformed timestamp",
            "stale timestamp",
            "timestamp in the future",
            "no matching signature",
            "malformed webhook-id",
        }
    else:  # pragma: no cover - a random signature matching would be a HMAC break
        raise AssertionError("an arbitrary request verified")


@settings(max_examples=300, database=None)
@given(signature=SIGNATURE_TEXT, body=st.binary(max_size=100), offset=st.integers(-290, 290))
def test_arbitrary_signature_headers_only_raise_verification_errors(signature: str, body: bytes, offset: int) -> None:
    # A valid id and timestamp, so that every example reaches the signature parsing.
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now() + offset), "webhook-signature": signature}
    with pytest.raises(WebhookVerificationError) as caught:
        WebhookVerifier((KEY_A, KEY_B)).verify(headers, body)
    assert caught.value.reason in {"missing headers", "malformed headers", "oversized headers", "no matching signature"}


SECRETS = st.binary(min_size=24, max_size=64).map(secret_for)


@settings(max_examples=200, database=None)
@given(
    body=st.binary(max_size=500),
    msg_id=st.one_of(st.uuids().map(str), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)),
    offset=st.integers(-290, 290),
    others=st.lists(SECRETS, max_size=3),
    position=st.integers(0, 3),
    noise=st.lists(st.sampled_from(["v2,abc", "v1,!!", "v1", "v1a,x:y", "v1,QUFB"]), max_size=3),
    key=st.binary(min_size=24, max_size=64),
    case=st.sampled_from([str.lower, str.upper, str.title]),
)
def test_valid_signature_always_verifies_and_any_body_change_breaks_it(
    body: bytes,
    msg_id: str,
    offset: int,
    others: list[str],
    position: int,
    noise: list[str],
    key: bytes,
    case: Callable[[str], str],
) -> None:
    gotrue_secrets = others[:position] + [secret_for(key)] + others[position:]
    sent = now() + offset
    signature = sign(gotrue_secrets, msg_id, sent, body)
    header = ", ".join([*noise, signature])
    headers = {
        case("webhook-id"): msg_id,
        case("webhook-timestamp"): str(sent),
        case("webhook-signature"): header,
    }
    verifier = WebhookVerifier((KEY_C, key))
    verifier.verify(headers, body)
    for tampered in (body + b"\x00", body[1:] if body else b"x"):
        with pytest.raises(WebhookVerificationError):
            verifier.verify(headers, tampered)


@settings(database=None)
@given(st.binary(max_size=100))
def test_go_base64_decode_agrees_with_python_on_canonical_input(data: bytes) -> None:
    assert go_base64_decode(base64.b64encode(data).decode()) == data
