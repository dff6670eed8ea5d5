"""Verify the Standard Webhooks signature GoTrue puts on Send SMS hook requests.

GoTrue (``internal/hooks/hookshttp``) signs ``"<webhook-id>.<webhook-timestamp>.<raw body>"`` with
HMAC-SHA256 once per configured ``v1,whsec_<base64>`` secret, and sends the results as
``webhook-signature: v1,<b64>, v1,<b64>`` (joined with comma *and* space). Every attempt carries a
fresh ``webhook-id`` and integer ``webhook-timestamp``; the body bytes stay the same.

Why this module does not call ``standardwebhooks.Webhook.verify`` (1.1.0):

* it reads the wall clock itself with a fixed ±5 min window, so neither ``now`` nor the tolerance
  can be supplied;
* one malformed token (``v1,A``: bad padding) raises out of the loop instead of being skipped, so
  a valid signature later in the header would be refused; GoTrue's ``", "`` join raises
  ``ValueError`` outright;
* it accepts ``float()`` timestamps (``1e9``, ``1700000000.9``) and signs the floored value.

Normalising the header so that the library could parse it means parsing every token here anyway;
what would be left for the library is the HMAC itself, which the standard library's ``hmac`` does
(``hmac.compare_digest`` for the comparison). ``tests/test_webhook.py`` checks this module against
the library's own ``Webhook.sign``/``Webhook.verify``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterator, Mapping

__all__ = [
    "DEFAULT_TOLERANCE_SECONDS",
    "WebhookSecretError",
    "WebhookVerificationError",
    "WebhookVerifier",
    "parse_secrets",
]

DEFAULT_TOLERANCE_SECONDS = 300.0
# GoTrue's configuration check is ^v1,whsec_[A-Za-z0-9+/=]{32,88}; shorter secrets never reach us.
_MIN_SECRET_CHARS = 32
# GoTrue sends ~49 characters per secret; this leaves room for dozens and bounds the work per request.
_MAX_HEADER_CHARS = 8192
_ID, _TIMESTAMP, _SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"


class WebhookSecretError(ValueError):
    """A configured secret is malformed. The message names the item by position, never its value."""


def parse_secrets(value: str) -> tuple[bytes, ...]:
    """Parse ``SEND_SMS_HOOK_SECRETS`` (GoTrue's ``GOTRUE_HOOK_SEND_SMS_SECRETS``) into HMAC keys.

    Items are separated by ``|``; empty (or blank) items are dropped, surrounding whitespace is
    ignored. Each item must be ``v1,whsec_<padded standard base64>``.
    """
    items = [part.strip() for part in value.split("|") if part.strip()]
    if not items:
        raise WebhookSecretError(
            "no webhook secret configured: expected one or more 'v1,whsec_<base64>' items separated by '|'"
        )
    return tuple(_parse_secret(item, position) for position, item in enumerate(items, start=1))


def _parse_secret(item: str, position: int) -> bytes:
    where = f"secret #{position}"
    if item.startswith("v1a,"):
        raise WebhookSecretError(
            f"{where} is an asymmetric 'v1a,' secret: GoTrue cannot sign with those (every hook call "
            "fails with HTTP 500); configure a symmetric 'v1,whsec_<base64>' secret"
        )
    if not item.startswith("v1,"):
        raise WebhookSecretError(f"{where} does not start with 'v1,' (expected 'v1,whsec_<base64>')")
    if not item.startswith("v1,whsec_"):
        raise WebhookSecretError(f"{where} lacks 'whsec_' after 'v1,' (expected 'v1,whsec_<base64>')")
    encoded = item[len("v1,whsec_") :]
    if len(encoded) < _MIN_SECRET_CHARS:
        raise WebhookSecretError(
            f"{where} is too short: GoTrue requires at least {_MIN_SECRET_CHARS} base64 characters after 'whsec_'"
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSecretError(
            f"{where} is not padded standard base64 after 'whsec_' (URL-safe '-'/'_' characters or "
            "missing '=' padding make GoTrue fail every hook call)"
        ) from None


class WebhookVerificationError(Exception):
    """The request is not an authentic, fresh GoTrue hook call.

    ``reason`` is short and safe to log or return: it never contains header values or the body.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WebhookVerifier:
    """Checks GoTrue's ``webhook-*`` headers against one or more HMAC keys (for secret rotation)."""

    def __init__(self, keys: tuple[bytes, ...], tolerance: float = DEFAULT_TOLERANCE_SECONDS) -> None:
        if not keys or not all(isinstance(key, bytes) and key for key in keys):
            raise ValueError("WebhookVerifier needs at least one non-empty key")
        if not tolerance >= 0:
            raise ValueError("tolerance must be a non-negative number of seconds")
        self._keys = keys
        self._tolerance = float(tolerance)

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
        """Return if any ``v1`` signature matches any key; raise ``WebhookVerificationError`` otherwise.

        Header names are matched case-insensitively. The timestamp must be a plain decimal integer
        within ``[now - tolerance, now + tolerance]`` (both bounds accepted). The signature covers
        the raw body bytes, whatever they are; parsing them is the caller's business.
        """
        msg_id, timestamp, signature = _required_headers(headers)
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 15:
            raise WebhookVerificationError("malformed timestamp")
        current = time.time() if now is None else now
        sent = int(timestamp)
        # Written so that a NaN `now` fails closed.
        if not sent >= current - self._tolerance:
            raise WebhookVerificationError("stale timestamp")
        if not sent <= current + self._tolerance:
            raise WebhookVerificationError("timestamp in the future")
        signed = f"{msg_id}.{timestamp}.".encode("ascii") + body
        expected = [hmac.new(key, signed, hashlib.sha256).digest() for key in self._keys]
        for candidate in _v1_signatures(signature):
            if any(hmac.compare_digest(candidate, digest) for digest in expected):
                return
        raise WebhookVerificationError("no matching signature")


def _required_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    found: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower() if isinstance(name, str) else ""
        if key not in (_ID, _TIMESTAMP, _SIGNATURE):
            continue
        if not isinstance(value, str) or found.get(key, value) != value:
            raise WebhookVerificationError("malformed headers")
        found[key] = value
    msg_id, timestamp, signature = (found.get(name, "") for name in (_ID, _TIMESTAMP, _SIGNATURE))
    if not (msg_id and timestamp and signature):
        raise WebhookVerificationError("missing headers")
    if max(len(msg_id), len(timestamp), len(signature)) > _MAX_HEADER_CHARS:
        raise WebhookVerificationError("oversized headers")
    if not (msg_id.isascii() and msg_id.isprintable()):
        raise WebhookVerificationError("malformed webhook-id")
    return msg_id, timestamp, signature


def _v1_signatures(header: str) -> Iterator[bytes]:
    """Decoded ``v1`` signatures from ``"v1,AAA, v1,BBB"``, ``"v1,AAA v1,BBB"`` or ``"v1,AAA"``.

    Tokens of other versions and malformed tokens are skipped, not fatal.
    """
    for token in header.split():
        version, comma, encoded = token.rstrip(",").partition(",")
        if not comma or version != "v1":
            continue
        try:
            yield base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
