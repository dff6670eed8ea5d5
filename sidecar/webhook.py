"""Verify the Standard Webhooks signature GoTrue puts on Send SMS hook requests.

GoTrue (``internal/hooks/hookshttp``) signs ``"<webhook-id>.<webhook-timestamp>.<raw body>"`` with
HMAC-SHA256 once per configured ``v1,whsec_<base64>`` secret, and sends the results as
``webhook-signature: v1,<b64>, v1,<b64>`` (joined with comma *and* space). Every attempt carries a
fresh ``webhook-id`` and integer ``webhook-timestamp``; the body bytes stay the same.

``standardwebhooks.Webhook.verify`` (>= 1.3) does the verification: byte-exact payload, the ±5 min
timestamp window we promise, HMAC and constant-time comparison. It splits the signature header on
single spaces, so the one thing done here is to rewrite GoTrue's ``", "`` join to ``" "``; the
library is then asked once per configured secret (secret rotation). What stays here is what the
library does not do: GoTrue's secret format, a bound on header sizes, and reasons safe to log.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import standardwebhooks

__all__ = [
    "WebhookSecretError",
    "WebhookVerificationError",
    "WebhookVerifier",
    "parse_secrets",
]

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
    """Checks GoTrue's ``webhook-*`` headers against one or more keys (for secret rotation)."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        if not keys or not all(isinstance(key, bytes) and key for key in keys):
            raise ValueError("WebhookVerifier needs at least one non-empty key")
        self._webhooks = tuple(standardwebhooks.Webhook(key) for key in keys)

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Return if any signature matches any key; raise ``WebhookVerificationError`` otherwise.

        Header names are matched case-insensitively; the timestamp must be within ±5 minutes of
        the wall clock. The signature covers the raw body bytes, whatever they are; parsing them
        is the caller's business.
        """
        msg_id, timestamp, signature = _required_headers(headers)
        normalised = {_ID: msg_id, _TIMESTAMP: timestamp, _SIGNATURE: signature.replace(", ", " ")}
        reason = "no matching signature"
        for webhook in self._webhooks:
            try:
                webhook.verify(body, normalised, json_parse=False)
                return
            except UnicodeEncodeError:  # a lone surrogate: not from HTTP, never a signature
                reason = "malformed headers"
            except standardwebhooks.WebhookVerificationError as exc:
                # A timestamp failure is the same for every key, so the last reason is the reason.
                reason = _REASONS.get(str(exc), "no matching signature")
        raise WebhookVerificationError(reason)


# The library's messages (fixed strings, never inputs) mapped to our short, stable reasons.
_REASONS = {
    "Message timestamp too old": "stale timestamp",
    "Message timestamp too new": "timestamp in the future",
    "Invalid Signature Headers": "malformed timestamp",
}


def _required_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    found: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower() if isinstance(name, str) else ""
        if key not in (_ID, _TIMESTAMP, _SIGNATURE):
            continue
        if not isinstance(value, str) or found.get(key, value) != value:
            raise WebhookVerificationError("malformed headers")
        found[key] = value
    values = tuple(found.get(name, "") for name in (_ID, _TIMESTAMP, _SIGNATURE))
    if not all(values):
        raise WebhookVerificationError("missing headers")
    if max(map(len, values)) > _MAX_HEADER_CHARS:
        raise WebhookVerificationError("oversized headers")
    msg_id, timestamp, signature = values
    if not (msg_id.isascii() and msg_id.isprintable()):
        raise WebhookVerificationError("malformed webhook-id")
    return msg_id, timestamp, signature
