"""An emulator of GoTrue's (Supabase Auth's) side of the Send SMS hook, for the sidecar's tests.

Read against supabase/auth's source, tag by tag (``internal/hooks/hookshttp/hookshttp.go``,
``hookserrors``, ``v0hooks``, the ``api/hooks.go`` of older tags, ``models``); see
/work/shared/reference/gotrue-send-sms-hook.md. Three parts:

Payloads, byte for byte as Go's ``json.Marshal`` writes them::

    user = make_user(phone="8613012341234")
    payload = otp_login("2.186.0", phone="8613012341234", otp="012345")
    body = go_json(payload)

Signing (``sign``), exactly ``generateSignatures``: one ``v1,<b64>`` per secret, joined with ``", "``.

The caller, ``GoTrueHookCaller``: POSTs like hookshttp (headers, one deadline, retries) and says what
the end user would get on the configured GoTrue version::

    caller = GoTrueHookCaller("http://127.0.0.1:8090/hook", "v1,whsec_...", version="2.186.0")
    result = caller.call(payload)            # or: await caller.call_async(payload)
    assert result.outcome == "success"       # or e.g. (500, "Invalid payload sent to hook")
    result.attempts[0].status, result.attempts[0].webhook_id

    caller = GoTrueHookCaller.for_app(app, "/hook", secrets, version=...)   # in-process ASGI

Where this follows the Go source rather than the reference page (checked in the source):

* Before v2.174 every error raised while talking to the hook (timeouts, content-type and size
  checks, 400/401/429/503/other statuses, and from v2.172 the unmarshal error) reaches the user as
  500 "Error running hook URI: <uri>"; the specific messages only show from v2.174.
* Up to v2.171, three 429/503 responses with ``Retry-After`` end in 500 "Error unmarshaling Send SMS
  output." (``runHTTPHook`` returns ``nil, nil`` and the caller unmarshals ``nil``), not success.
* Up to v2.173 the output struct has a typed ``error`` field: ``{"error": "text"}`` or a non-integer
  ``http_code`` is an unmarshal failure (500), not success.

Not emulated: response handling before v2.164 (the caller refuses such versions; the payload
builders do go back to v2.146), redirects (GoTrue follows them; this caller does not), HTTP/2, RFC 2231
parameter continuations in ``mime.ParseMediaType``, JSON nesting deeper than Python's recursion limit.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import httpx

Version = tuple[int, int, int]

# The tag pinned by supabase/supabase's self-hosted docker-compose.yml.
DEFAULT_VERSION: Version = (2, 186, 0)
# The latest tag the reference was read against.
LATEST_VERSION: Version = (2, 196, 0)
OLDEST_CALLER_VERSION: Version = (2, 164, 0)

HOOK_TIMEOUT = 5.0  # hookshttp: defaultHTTPHookTimeout, one deadline for the whole invocation
HOOK_BACKOFF = 2.0  # httpHookBackoffDuration, after transport errors only
HOOK_RETRIES = 3  # defaultHTTPHookRetries: attempts in total
RESPONSE_LIMIT = 200 * 1024  # payloadLimit

GO_USER_AGENT = "Go-http-client/1.1"
MFA_FAILURE = (500, "error invoking hook")
_UNAVAILABLE = "Service currently unavailable due to hook"
_UNMARSHAL_SMS = "Error unmarshaling Send SMS output."


def parse_version(version: str | Sequence[int]) -> Version:
    """``"2.186.0"``, ``"v2.186"`` or ``(2, 186, 0)`` -> ``(2, 186, 0)``."""
    if isinstance(version, str):
        parts = [int(p) for p in version.strip().removeprefix("v").split("-")[0].split(".")]
    else:
        parts = [int(p) for p in version]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"not a version: {version!r}")
    parts += [0] * (3 - len(parts))
    return (parts[0], parts[1], parts[2])


# --------------------------------------------------------------------------------------------------
# Go encoding/json


_GO_HTML_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)
# A lone surrogate in U+DC80..U+DCFF is how Python's "surrogateescape" carries one invalid byte;
# Go writes each invalid byte of a string as the six characters \ufffd.
_INVALID_BYTE = re.compile("[\udc80-\udcff]")


def go_json(value: Any, *, go_before_1_22: bool = False) -> bytes:
    """``json.Marshal(value)`` as Go writes it: compact, HTML-safe, no trailing newline.

    Dict order is kept as given (build struct fields in declaration order, and sort Go maps with
    :func:`go_map`). Floats are refused: Go and Python format some of them differently.
    ``go_before_1_22``: Go 1.21 (GoTrue before v2.153) wrote ``\\b`` and ``\\f`` as ``\\u0008`` and
    ``\\u000c``.
    """
    _refuse_floats(value)
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    text = _INVALID_BYTE.sub(r"\\ufffd", text.translate(_GO_HTML_ESCAPES))
    if go_before_1_22:
        text = re.sub(r"(?<!\\)((?:\\\\)*)\\([bf])", lambda m: m[1] + ("\\u0008" if m[2] == "b" else "\\u000c"), text)
    return text.encode("utf-8")


def _refuse_floats(value: Any) -> None:
    if isinstance(value, float):
        raise TypeError("floats are not supported: Go and Python format some of them differently")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            _refuse_floats(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item)


def go_map(value: Any) -> Any:
    """A ``map[string]any`` (``app_metadata``, ``user_metadata``, ``identity_data``): Go sorts its keys,
    at every level."""
    if isinstance(value, Mapping):
        return {key: go_map(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [go_map(item) for item in value]
    return value


def go_time(moment: datetime, *, nanosecond: int | None = None) -> str:
    """``time.Time`` as JSON: RFC 3339 with the fraction's trailing zeros trimmed, ``Z`` for offset 0.

    ``nanosecond`` replaces the microseconds, for Go's nanosecond clock (``metadata.time``).
    """
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("go_time needs an aware datetime")
    ns = moment.microsecond * 1000 if nanosecond is None else nanosecond
    if not 0 <= ns < 1_000_000_000:
        raise ValueError("nanosecond out of range")
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if ns:
        text += "." + f"{ns:09d}".rstrip("0")
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes > 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


# --------------------------------------------------------------------------------------------------
# Payloads

TimeLike = str | datetime

DEFAULT_PHONE = "8613012341234"
# Fixed, realistic defaults so that payloads are reproducible: a user created in January who last
# signed in in March; microsecond fractions as Postgres stores them.
DEFAULT_CREATED_AT = "2026-01-05T08:30:12.345678Z"
DEFAULT_CONFIRMED_AT = "2026-01-05T08:31:02.117Z"
DEFAULT_SENT_AT = "2026-03-02T06:00:41.9031Z"
DEFAULT_LAST_SIGN_IN_AT = "2026-03-02T06:01:05.52447Z"
DEFAULT_UPDATED_AT = "2026-03-02T06:01:05.530012Z"


def _time(value: TimeLike | None) -> str | None:
    return go_time(value) if isinstance(value, datetime) else value


def make_user(
    *,
    id: str | None = None,
    aud: str = "authenticated",
    role: str = "authenticated",
    email: str = "",
    email_confirmed_at: TimeLike | None = None,
    invited_at: TimeLike | None = None,
    phone: str = DEFAULT_PHONE,
    phone_confirmed_at: TimeLike | None = DEFAULT_CONFIRMED_AT,
    confirmation_sent_at: TimeLike | None = DEFAULT_SENT_AT,
    confirmed_at: TimeLike | None | Literal["auto"] = "auto",
    recovery_sent_at: TimeLike | None = None,
    new_email: str | None = None,
    email_change_sent_at: TimeLike | None = None,
    new_phone: str | None = None,
    phone_change_sent_at: TimeLike | None = None,
    reauthentication_sent_at: TimeLike | None = None,
    last_sign_in_at: TimeLike | None = DEFAULT_LAST_SIGN_IN_AT,
    app_metadata: Mapping[str, Any] | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    factors: Sequence[Mapping[str, Any]] | None = None,
    identities: Sequence[Mapping[str, Any]] | None = (),
    created_at: TimeLike = DEFAULT_CREATED_AT,
    updated_at: TimeLike = DEFAULT_UPDATED_AT,
    banned_until: TimeLike | None = None,
    deleted_at: TimeLike | None = None,
    is_anonymous: bool = False,
) -> dict[str, Any]:
    """``models.User`` as GoTrue (v2.196) marshals it; ``None`` omits an ``omitempty`` field.

    Defaults: a confirmed phone user who signed in before. ``confirmed_at="auto"`` is the database's
    generated ``least(email_confirmed_at, phone_confirmed_at)``. ``identities=None`` gives ``null``.
    ``email`` and ``phone`` are ``""`` when unset, never ``null``.
    """
    if confirmed_at == "auto":
        confirmed = [t for t in (_time(email_confirmed_at), _time(phone_confirmed_at)) if t]
        # Same zone and format in both, so the string order is the time order.
        confirmed_at = min(confirmed) if confirmed else None
    fields: list[tuple[str, Any, bool]] = [  # name, value, omitempty
        ("id", id or str(uuid.uuid4()), False),
        ("aud", aud, False),
        ("role", role, False),
        ("email", email, False),
        ("email_confirmed_at", _time(email_confirmed_at), True),
        ("invited_at", _time(invited_at), True),
        ("phone", phone, False),
        ("phone_confirmed_at", _time(phone_confirmed_at), True),
        ("confirmation_sent_at", _time(confirmation_sent_at), True),
        ("confirmed_at", _time(confirmed_at), True),
        ("recovery_sent_at", _time(recovery_sent_at), True),
        ("new_email", new_email or None, True),
        ("email_change_sent_at", _time(email_change_sent_at), True),
        ("new_phone", new_phone or None, True),
        ("phone_change_sent_at", _time(phone_change_sent_at), True),
        ("reauthentication_sent_at", _time(reauthentication_sent_at), True),
        ("last_sign_in_at", _time(last_sign_in_at), True),
        (
            "app_metadata",
            go_map({"provider": "phone", "providers": ["phone"]} if app_metadata is None else app_metadata),
            False,
        ),
        ("user_metadata", go_map({} if user_metadata is None else user_metadata), False),
        ("factors", [dict(f) for f in factors] if factors else None, True),
        ("identities", None if identities is None else [dict(i) for i in identities], False),
        ("created_at", _time(created_at), False),
        ("updated_at", _time(updated_at), False),
        ("banned_until", _time(banned_until), True),
        ("deleted_at", _time(deleted_at), True),
        ("is_anonymous", is_anonymous, False),
    ]
    return {name: value for name, value, omitempty in fields if not (omitempty and value is None)}


def make_phone_factor(
    *,
    phone: str,
    id: str | None = None,
    status: str = "verified",
    friendly_name: str | None = None,
    created_at: TimeLike = DEFAULT_CREATED_AT,
    updated_at: TimeLike = DEFAULT_UPDATED_AT,
    last_challenged_at: TimeLike | None = None,
) -> dict[str, Any]:
    """``models.Factor`` for a phone factor (``last_challenged_at`` is ``null``, not omitted)."""
    factor: dict[str, Any] = {
        "id": id or str(uuid.uuid4()),
        "created_at": _time(created_at),
        "updated_at": _time(updated_at),
        "status": status,
    }
    if friendly_name:
        factor["friendly_name"] = friendly_name
    factor.update(factor_type="phone", phone=phone, last_challenged_at=_time(last_challenged_at))
    return factor


def make_phone_identity(
    *,
    user_id: str,
    phone: str,
    id: str | None = None,
    created_at: TimeLike = DEFAULT_CREATED_AT,
    updated_at: TimeLike = DEFAULT_UPDATED_AT,
    last_sign_in_at: TimeLike | None = DEFAULT_CREATED_AT,
) -> dict[str, Any]:
    """``models.Identity`` of provider ``phone`` (``id`` is the provider id, the user's id)."""
    identity: dict[str, Any] = {
        "identity_id": id or str(uuid.uuid4()),
        "id": user_id,
        "user_id": user_id,
        "identity_data": go_map({"email_verified": False, "phone": phone, "phone_verified": False, "sub": user_id}),
        "provider": "phone",
    }
    if last_sign_in_at is not None:
        identity["last_sign_in_at"] = _time(last_sign_in_at)
    identity.update(created_at=_time(created_at), updated_at=_time(updated_at))
    return identity


def make_metadata(
    *, uuid_: str | None = None, time_: TimeLike | None = None, ip_address: str | None = None
) -> dict[str, Any]:
    """``v0hooks.Metadata`` (v2.187+): ``uuid`` is per invocation, the same on every retry."""
    if time_ is None:
        time_ = go_time(datetime.now(UTC), nanosecond=time.time_ns() % 1_000_000_000)
    metadata: dict[str, Any] = {"uuid": uuid_ or str(uuid.uuid4()), "time": _time(time_), "name": "send-sms"}
    if ip_address:
        metadata["ip_address"] = ip_address
    return metadata


def send_sms_payload(
    version: str | Sequence[int],
    *,
    user: Mapping[str, Any],
    otp: str,
    phone: str | None = None,
    sms_type: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``SendSMSInput`` of that GoTrue version.

    < 2.150: ``{user_id, phone, otp}`` with ``user.phone``. 2.150+: ``{user, sms: {otp[, sms_type]}}``
    (``sms_type`` since 2.158); 2.180+: ``sms.phone`` (``phone``, default ``user.phone``);
    2.187+: ``metadata`` first (``metadata``, default a fresh :func:`make_metadata`).
    """
    v = parse_version(version)
    if sms_type and v < (2, 158, 0):
        raise ValueError("GoTrue sends sms_type (MFA over the hook) only since v2.158.0")
    if v < (2, 150, 0):
        return {"user_id": user["id"], "phone": user["phone"], "otp": otp}
    sms: dict[str, Any] = {}
    if otp:
        sms["otp"] = otp
    if sms_type:
        sms["sms_type"] = sms_type
    destination = user["phone"] if phone is None else phone
    if v >= (2, 180, 0) and destination:
        sms["phone"] = destination
    payload: dict[str, Any] = {}
    if v >= (2, 187, 0):
        payload["metadata"] = dict(metadata) if metadata is not None else make_metadata()
    payload["user"] = dict(user)
    payload["sms"] = sms
    return payload


def otp_login(
    version: str | Sequence[int],
    *,
    phone: str = DEFAULT_PHONE,
    otp: str = "123456",
    user: Mapping[str, Any] | None = None,
    new_user: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``POST /otp`` (also ``/signup``, ``/resend type=sms``, ``/reauthenticate``): ``sms.phone`` is the
    user's phone. ``new_user``: a sign-up through OTP, nothing confirmed or sent yet."""
    if user is None:
        if new_user:
            user = make_user(phone=phone, phone_confirmed_at=None, confirmation_sent_at=None, last_sign_in_at=None)
        else:
            user = make_user(phone=phone)
    return send_sms_payload(version, user=user, otp=otp, phone=phone, metadata=metadata)


def phone_change(
    version: str | Sequence[int],
    *,
    old_phone: str = DEFAULT_PHONE,
    new_phone: str = "8613112345678",
    otp: str = "123456",
    user: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``PUT /user`` with a new phone: ``user.phone`` is the old number; the new one is in
    ``user.new_phone`` and (2.180+) ``sms.phone``."""
    if user is None:
        user = make_user(phone=old_phone, new_phone=new_phone)
    return send_sms_payload(version, user=user, otp=otp, phone=new_phone, metadata=metadata)


def mfa_challenge(
    version: str | Sequence[int],
    *,
    factor_phone: str = "8613212345678",
    otp: str = "123456",
    user_phone: str = "",
    user: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``POST /factors/{id}/challenge`` on a phone factor: ``sms_type: "mfa"``, ``sms.phone`` is the
    factor's phone; ``user.phone`` may be empty (an email user)."""
    if user is None:
        user = make_user(
            email="" if user_phone else "someone@example.com",
            email_confirmed_at=None if user_phone else DEFAULT_CONFIRMED_AT,
            phone=user_phone,
            phone_confirmed_at=DEFAULT_CONFIRMED_AT if user_phone else None,
            app_metadata=None if user_phone else {"provider": "email", "providers": ["email"]},
            factors=[make_phone_factor(phone=factor_phone)],
        )
    return send_sms_payload(version, user=user, otp=otp, phone=factor_phone, sms_type="mfa", metadata=metadata)


# --------------------------------------------------------------------------------------------------
# Secrets and signatures


class SigningError(ValueError):
    """``generateSignatures`` failed; the text is Go's error.

    GoTrue answers 500 "Error generating signatures: <text>" (v2.174+).
    """


def split_secrets(value: str) -> list[str]:
    """``GOTRUE_HOOK_SEND_SMS_SECRETS`` as GoTrue reads it: split on ``|``, empty parts dropped."""
    return [part for part in value.split("|") if part]


def generate_secret() -> str:
    """What the docs suggest: ``echo "v1,whsec_$(openssl rand -base64 32)"``."""
    return "v1,whsec_" + base64.b64encode(os.urandom(32)).decode()


_B64 = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def go_base64_decode(text: str) -> bytes:
    """``base64.StdEncoding.DecodeString``: padding required, ``\\r``/``\\n`` skipped, lax trailing bits.

    Raises ``SigningError("illegal base64 data at input byte N")`` with Go's offset.
    """
    src = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    si = 0
    while si < len(src):
        values: list[int] = []
        while len(values) < 4:
            if si == len(src):
                if not values:
                    return bytes(out)
                raise SigningError(f"illegal base64 data at input byte {si - len(values)}")
            char = src[si]
            si += 1
            if char in _B64:
                values.append(_B64[char])
                continue
            if char in b"\r\n":
                continue
            if char != ord("=") or len(values) < 2:
                raise SigningError(f"illegal base64 data at input byte {si - 1}")
            if len(values) == 2:  # "==" expected, the first "=" already consumed
                while si < len(src) and src[si] in b"\r\n":
                    si += 1
                if si == len(src):
                    raise SigningError(f"illegal base64 data at input byte {len(src)}")
                if src[si] != ord("="):
                    raise SigningError(f"illegal base64 data at input byte {si - 1}")
                si += 1
            while si < len(src) and src[si] in b"\r\n":
                si += 1
            if si < len(src):
                raise SigningError(f"illegal base64 data at input byte {si}")
            break
        number = sum(value << (18 - 6 * i) for i, value in enumerate(values))
        out += number.to_bytes(3, "big")[: len(values) - 1]
    return bytes(out)


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """GoTrue's ``webhook-signature`` value: ``"v1,<b64>, v1,<b64>"``, ``""`` without secrets.

    Each secret must start with ``v1,`` (else ``SigningError("invalid signature format")``, which is
    what ``v1a,`` secrets get); ``whsec_`` is optional to Go (``TrimPrefix``).
    """
    signatures = []
    for secret in secrets:
        if not secret.startswith("v1,"):
            raise SigningError("invalid signature format")
        key = go_base64_decode(secret[len("v1,") :].removeprefix("whsec_"))
        digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        signatures.append("v1," + base64.b64encode(digest).decode("ascii"))
    return ", ".join(signatures)


def signed_headers(
    body: bytes, secrets: str, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """The webhook-* headers GoTrue sends with `body`: a new id and now, unless given."""
    msg_id = msg_id or str(uuid.uuid4())
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(split_secrets(secrets), msg_id, ts, body)}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Go's reading of the response: mime.ParseMediaType and json.Unmarshal


_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')


def _is_token_char(char: str) -> bool:
    return " " < char < "\x7f" and char not in _TSPECIALS


def _consume_token(text: str) -> tuple[str, str]:
    end = 0
    while end < len(text) and _is_token_char(text[end]):
        end += 1
    return text[:end], text[end:]


def _consume_value(text: str) -> tuple[str, str]:
    if not text or text[0] != '"':
        return _consume_token(text)
    value: list[str] = []
    i = 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(value), text[i + 1 :]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in _TSPECIALS:
            value.append(text[i + 1])
            i += 2
            continue
        if char in "\r\n":
            return "", text
        value.append(char)
        i += 1
    return "", text


def _consume_media_param(text: str) -> tuple[str, str, str]:
    rest = text.lstrip()
    if not rest.startswith(";"):
        return "", "", text
    param, rest = _consume_token(rest[1:].lstrip())
    if not param:
        return "", "", text
    rest = rest.lstrip()
    if not rest.startswith("="):
        return "", "", text
    rest = rest[1:].lstrip()
    value, rest2 = _consume_value(rest)
    if not value and rest2 == rest:
        return "", "", text
    return param.lower(), value, rest2


def go_parse_media_type(value: str) -> str:
    """Go's ``mime.ParseMediaType(value)`` media type; ``ValueError`` with Go's error text if it errs."""
    base = value.split(";", 1)[0]
    media_type = base.lower().strip()
    kind, rest = _consume_token(media_type)
    if not kind:
        raise ValueError("mime: no media type")
    if rest:
        if not rest.startswith("/"):
            raise ValueError("mime: expected slash after first token")
        subtype, rest = _consume_token(rest[1:])
        if not subtype:
            raise ValueError("mime: expected token after slash")
        if rest:
            raise ValueError("mime: unexpected content after media subtype")
    params: dict[str, str] = {}
    remaining = value[len(base) :]
    while remaining:
        remaining = remaining.lstrip()
        if not remaining:
            break
        key, param_value, rest = _consume_media_param(remaining)
        if not key:
            if rest.strip() == ";":
                break  # trailing semicolons are ignored
            raise ValueError("mime: invalid media parameter")
        if params.get(key, param_value) != param_value:
            raise ValueError("mime: duplicate parameter name")
        params[key] = param_value
        remaining = rest
    return media_type


@dataclass(frozen=True)
class _Number:
    text: str


class _Object(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs in document order (Go sees duplicates in order)."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


_GO_DECODER = json.JSONDecoder(
    object_pairs_hook=_Object, parse_int=_Number, parse_float=_Number, parse_constant=_refuse_constant
)
_INVALID = object()


def _go_parse(body: bytes) -> Any:
    """The document Go's decoder sees, or ``_INVALID``. Go keeps invalid UTF-8 inside strings (as
    U+FFFD) and rejects it elsewhere; ``errors="replace"`` does the same here."""
    try:
        return _GO_DECODER.decode(body.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return _INVALID


def _go_int(number: Any) -> int | None:
    """A JSON value decoded into a Go ``int``: only integer literals within int64."""
    if not isinstance(number, _Number) or not re.fullmatch(r"-?\d+", number.text):
        return None
    value = int(number.text)
    return value if -(2**63) <= value < 2**63 else None


def _decode_hook_error(document: _Object, *, pointer: bool) -> tuple[bool, tuple[int, str] | None]:
    """Go-decode the ``error`` field, ``{http_code int; message string}``, of an object.

    Keys match case-insensitively, duplicates apply in order (a pointer is allocated once and later
    objects merge into it, ``null`` resets a pointer and is ignored by a value). Returns
    (no type error, (http_code, message) or None when a pointer stayed nil).
    """
    ok = True
    fields: dict[str, Any] | None = None if pointer else {"http_code": 0, "message": ""}
    for key, value in document:
        if key.casefold() != "error":
            continue
        if value is None:
            fields = None if pointer else fields
            continue
        if not isinstance(value, _Object):
            ok = False
            continue
        if fields is None:
            fields = {"http_code": 0, "message": ""}
        for inner_key, inner in value:
            name = inner_key.casefold()
            if name not in fields or inner is None:
                continue
            if name == "http_code" and _go_int(inner) is not None:
                fields[name] = _go_int(inner)
            elif name == "message" and isinstance(inner, str):
                fields[name] = inner
            else:
                ok = False
    return ok, None if fields is None else (fields["http_code"], fields["message"])


# --------------------------------------------------------------------------------------------------
# The caller


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt: what was sent and what came back."""

    webhook_id: str
    timestamp: int
    request_headers: tuple[tuple[str, str], ...]
    status: int | None = None  # None: no response (transport error or deadline)
    headers: httpx.Headers | None = None
    body: bytes = b""  # raw response bytes as read, at most the response limit + 1
    error: str | None = None  # the transport error or timeout, if any

    @property
    def signature(self) -> str:
        return dict(self.request_headers)["Webhook-Signature"]


@dataclass(frozen=True)
class HookResult:
    """What the end user gets from the phone flow (``outcome``) or the MFA challenge (``mfa_outcome``)."""

    version: Version
    ok: bool
    status: int  # the HTTP status of the user's response: 200 on success
    message: str | None  # the error message shown, None on success
    code: str | None  # the `code` of GoTrue's 2024-01-01 error body, None on success
    request_body: bytes
    attempts: tuple[Attempt, ...]

    @property
    def outcome(self) -> Literal["success"] | tuple[int, str]:
        return "success" if self.ok else (self.status, self.message or "")

    @property
    def mfa_outcome(self) -> Literal["success"] | tuple[int, str]:
        return "success" if self.ok else MFA_FAILURE


@dataclass(frozen=True)
class _Send:
    headers: tuple[tuple[str, str], ...]
    timeout: float


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _Reply:
    status: int | None  # None: no response
    headers: httpx.Headers | None
    body: bytes
    error: str | None = None
    timed_out: bool = False  # no response before the deadline (GoTrue: context deadline exceeded)
    body_failed: bool = False  # a response, but reading its body failed or ran past the deadline


# Where GoTrue raises an error decides whether the user sees its message. Before v2.174 everything
# raised inside the HTTP dispatcher is replaced by 500 "Error running hook URI: <uri>"; errors that
# are not HTTPErrors (a failed body read) are replaced on every version.
Layer = Literal["dispatch", "invoke", "raw"]


@dataclass(frozen=True)
class _Failure:
    status: int
    message: str
    code: str | None  # GoTrue's ErrorCode; None (error objects) renders as unexpected_failure/unknown
    layer: Layer = "dispatch"


_Action = _Send | _Sleep


class GoTrueHookCaller:
    """Calls a Send SMS hook the way GoTrue's hookshttp does and interprets the answer per version.

    ``secrets``: the ``GOTRUE_HOOK_SEND_SMS_SECRETS`` value (``|``-separated) or a list of items.
    ``transport`` / ``async_transport``: httpx transports for :meth:`call` / :meth:`call_async`
    (e.g. ``httpx.MockTransport(handler)``, ``httpx.ASGITransport(app)``); without one, the network.
    :meth:`call` with only an ``async_transport`` runs :meth:`call_async` in a new event loop.
    ``timeout``, ``backoff``, ``retries``, ``response_limit``: GoTrue's constants, smaller in tests.
    ``clock``: the wall clock for ``Webhook-Timestamp`` (skew it to test the receiver's window).
    """

    def __init__(
        self,
        url: str,
        secrets: str | Sequence[str] = (),
        *,
        version: str | Sequence[int] = DEFAULT_VERSION,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = HOOK_TIMEOUT,
        backoff: float = HOOK_BACKOFF,
        retries: int = HOOK_RETRIES,
        response_limit: int = RESPONSE_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.secrets = split_secrets(secrets) if isinstance(secrets, str) else list(secrets)
        self.version = parse_version(version)
        if self.version < OLDEST_CALLER_VERSION:
            raise ValueError(
                "response handling before v2.164 is not emulated (content type checked before the "
                "status, Content-Length required, other messages)"
            )
        self.transport = transport
        self.async_transport = async_transport
        self.timeout = timeout
        self.backoff = backoff
        self.retries = retries
        self.response_limit = response_limit
        self.clock = clock

    @classmethod
    def for_app(
        cls,
        app: Any,
        path: str = "/",
        secrets: str | Sequence[str] = (),
        *,
        raise_app_exceptions: bool = True,
        **options: Any,
    ) -> GoTrueHookCaller:
        """A caller for an ASGI app in this process (``call`` and ``call_async`` both work)."""
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        return cls("http://localhost" + path, secrets, async_transport=transport, **options)

    def encode(self, payload: Mapping[str, Any]) -> bytes:
        """The request body this GoTrue version would send for ``payload``."""
        return go_json(payload)  # every version the caller emulates was built with Go 1.22 or later

    # -- drivers -----------------------------------------------------------------------------------

    def call(self, payload: Mapping[str, Any] | bytes) -> HookResult:
        """Invoke the hook once (up to ``retries`` attempts), synchronously."""
        if self.transport is None and self.async_transport is not None:
            return anyio.run(self.call_async, payload)
        body = payload if isinstance(payload, bytes) else self.encode(payload)
        steps = self._invoke(body)
        reply: _Reply | None = None
        with httpx.Client(transport=self.transport, trust_env=False) as client:
            while True:
                try:
                    action = steps.send(reply)
                except StopIteration as done:
                    result: HookResult = done.value
                    return result
                if isinstance(action, _Sleep):
                    time.sleep(action.seconds)
                    reply = None
                else:
                    reply = self._exchange(client, body, action)

    async def call_async(self, payload: Mapping[str, Any] | bytes) -> HookResult:
        """Invoke the hook once (up to ``retries`` attempts) with an ``httpx.AsyncClient``."""
        body = payload if isinstance(payload, bytes) else self.encode(payload)
        steps = self._invoke(body)
        reply: _Reply | None = None
        async with httpx.AsyncClient(transport=self.async_transport, trust_env=False) as client:
            while True:
                try:
                    action = steps.send(reply)
                except StopIteration as done:
                    result: HookResult = done.value
                    return result
                if isinstance(action, _Sleep):
                    await anyio.sleep(action.seconds)
                    reply = None
                else:
                    reply = await self._exchange_async(client, body, action)

    def _request(self, body: bytes, action: _Send) -> httpx.Request:
        # Built directly, so the client's default headers (Accept, Connection...) are not added.
        return httpx.Request(
            "POST",
            self.url,
            headers=list(action.headers),
            content=body,
            extensions={"timeout": httpx.Timeout(max(action.timeout, 0.001)).as_dict()},
        )

    def _exchange(self, client: httpx.Client, body: bytes, action: _Send) -> _Reply:
        try:
            response = client.send(self._request(body, action), stream=True, follow_redirects=False)
        except httpx.TimeoutException as exc:
            return _Reply(None, None, b"", error=repr(exc), timed_out=True)
        except httpx.TransportError as exc:
            return _Reply(None, None, b"", error=repr(exc))
        data = bytearray()
        try:
            for chunk in _raw_chunks(response):
                data += chunk
                if len(data) > self.response_limit:
                    break
        except httpx.TransportError as exc:  # including read timeouts
            return _Reply(response.status_code, response.headers, bytes(data), repr(exc), body_failed=True)
        finally:
            response.close()
        return _Reply(response.status_code, response.headers, bytes(data[: self.response_limit + 1]))

    async def _exchange_async(self, client: httpx.AsyncClient, body: bytes, action: _Send) -> _Reply:
        status: int | None = None
        headers: httpx.Headers | None = None
        data = bytearray()
        try:
            with anyio.fail_after(max(action.timeout, 0)):
                response = await client.send(self._request(body, action), stream=True, follow_redirects=False)
                status, headers = response.status_code, response.headers
                try:
                    async for chunk in _araw_chunks(response):
                        data += chunk
                        if len(data) > self.response_limit:
                            break
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TransportError) as exc:
            timed_out = isinstance(exc, TimeoutError | httpx.TimeoutException)
            if status is None:
                return _Reply(None, None, b"", repr(exc), timed_out=timed_out)
            return _Reply(status, headers, bytes(data), repr(exc), body_failed=True)
        return _Reply(status, headers, bytes(data[: self.response_limit + 1]))

    # -- hookshttp ---------------------------------------------------------------------------------

    def _invoke(self, body: bytes) -> Generator[_Action, _Reply | None, HookResult]:
        deadline = time.monotonic() + self.timeout
        attempts: list[Attempt] = []

        def finish(failure: _Failure | None) -> HookResult:
            return self._result(failure, body, attempts)

        for attempt in range(self.retries):
            msg_id = str(uuid.uuid4())
            timestamp = math.floor(self.clock())
            try:
                signature = sign(self.secrets, msg_id, timestamp, body)
            except SigningError as exc:
                return finish(_Failure(500, f"Error generating signatures: {exc}", "unexpected_failure"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return finish(self._deadline())
            headers = (
                ("User-Agent", GO_USER_AGENT),
                ("Content-Length", str(len(body))),
                ("Accept-Encoding", "identity"),
                ("Content-Type", "application/json"),
                ("Webhook-Id", msg_id),
                ("Webhook-Signature", signature),
                ("Webhook-Timestamp", str(timestamp)),
            )
            reply = yield _Send(headers, remaining)
            assert reply is not None
            attempts.append(Attempt(msg_id, timestamp, headers, reply.status, reply.headers, reply.body, reply.error))
            late = time.monotonic() > deadline  # transports that ignore timeouts (MockTransport)
            if reply.timed_out or (late and not reply.body_failed):
                return finish(self._deadline())
            if reply.status is None:  # a transport error: back off, retry
                if attempt < self.retries - 1:
                    remaining = deadline - time.monotonic()
                    if remaining <= self.backoff:
                        yield _Sleep(max(remaining, 0))
                        return finish(self._deadline())
                    yield _Sleep(self.backoff)
                    continue
                return finish(_Failure(422, "Failed to reach hook after maximum retries", "hook_timeout_after_retry"))
            if reply.status in (429, 503):
                if _first(reply.headers, "retry-after"):
                    continue  # at once, whatever the value
                return finish(_Failure(500, _UNAVAILABLE, "unexpected_failure"))
            return finish(self._response(reply))

        # Only 429/503 with Retry-After get here.
        if self.version < (2, 172, 0):
            # runHTTPHook returned (nil, nil), and invokeHook then unmarshalled nil.
            return finish(_Failure(500, _UNMARSHAL_SMS, "unexpected_failure", "invoke"))
        return finish(_Failure(500, _UNAVAILABLE, "unexpected_failure"))

    def _deadline(self) -> _Failure:
        return _Failure(422, f"Failed to reach hook within maximum time of {self.timeout:f} seconds", "hook_timeout")

    def _response(self, reply: _Reply) -> _Failure | None:
        status, v = reply.status, self.version
        content_type = _first(reply.headers, "content-type")
        if status == 204 and (v >= (2, 179, 0) or (v >= (2, 172, 0) and not content_type)):
            return None
        # From here on, a 204 (before 2.179) is read like a 200 with an empty body.
        if status not in (200, 202, 204):
            messages = {400: "Invalid payload sent to hook", 401: "Hook requires authorization token"}
            message = messages.get(status or 0, f"Unexpected status code returned from hook: {status}")
            return _Failure(500, message, "unexpected_failure")
        invalid = "hook_payload_invalid_content_type"
        if not content_type:
            return _Failure(400, "Invalid Content-Type: Missing Content-Type header", invalid)
        try:
            media_type = go_parse_media_type(content_type)
        except ValueError as exc:
            return _Failure(400, f"Invalid Content-Type header: {exc}", invalid)
        if media_type != "application/json":
            return _Failure(400, f"Invalid JSON response. Received content-type: {content_type}", invalid)
        if reply.body_failed:
            return _Failure(500, "reading the body failed", None, "raw")
        if len(reply.body) > self.response_limit:
            message = f"Payload size exceeded size limit of {self.response_limit} bytes"
            return _Failure(422, message, "hook_payload_over_size_limit")
        document = _go_parse(reply.body)
        if v >= (2, 187, 0) and isinstance(document, _Object):
            # hookserrors.Check: a decoding error means "no error object", not a failure.
            decoded, error = _decode_hook_error(document, pointer=True)
            if decoded and error is not None and error[1]:
                return _Failure(error[0] or 500, error[1], None)
        if v >= (2, 174, 0):  # SendSMSOutput is struct{}: any object, or null
            if document is None or isinstance(document, _Object):
                return None
            return _Failure(500, "Error unmarshaling JSON output.", "unexpected_failure")
        # Up to 2.173 SendSMSOutput is struct{HookError AuthHookError `json:"error,omitempty"`}.
        decoded, error = document is None or isinstance(document, _Object), None
        if isinstance(document, _Object):
            decoded, error = _decode_hook_error(document, pointer=False)
        if not decoded and v < (2, 172, 0):
            return _Failure(500, _UNMARSHAL_SMS, "unexpected_failure", "invoke")
        if not decoded:
            return _Failure(500, "Error unmarshaling JSON output.", "unexpected_failure")
        if error is not None and error[1]:  # IsError: a non-empty message
            return _Failure(error[0] or 500, error[1], None, "invoke")
        return None

    def _result(self, failure: _Failure | None, body: bytes, attempts: list[Attempt]) -> HookResult:
        if failure is None:
            return HookResult(self.version, True, 200, None, None, body, tuple(attempts))
        status, message, code = failure.status, failure.message, failure.code
        if failure.layer == "raw" or (failure.layer == "dispatch" and self.version < (2, 174, 0)):
            status, message, code = 500, f"Error running hook URI: {self.url}", "unexpected_failure"
        if code is None:
            code = "unexpected_failure" if status == 500 else "unknown"
        return HookResult(self.version, False, status, message, code, body, tuple(attempts))


def _raw_chunks(response: httpx.Response) -> Iterator[bytes]:
    """The undecoded body (GoTrue asks for identity and does not decompress).

    A response built from bytes (``httpx.Response(200, content=...)`` in a MockTransport) was read,
    and decoded, when built; give MockTransport responses ``stream=httpx.ByteStream(raw)`` to keep
    a ``Content-Encoding`` body raw.
    """
    try:
        yield from response.iter_raw()
    except httpx.StreamConsumed:
        yield response.content


async def _araw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.StreamConsumed:
        yield response.content


def _first(headers: httpx.Headers | None, name: str) -> str:
    """``http.Header.Get``: the first value, or ``""``."""
    values = headers.get_list(name) if headers is not None else []
    return values[0] if values else ""
