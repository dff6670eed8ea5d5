"""Provider failures as short texts that are safe to store, return and log.

The HTTP stacks under the Aliyun SDK put the request URL in their error texts, and with it the query
string (`PhoneNumbers=…&TemplateParam={"code":"…"}`); a parse error quotes the response body. Those
texts reach the outbox, `phone_code_status`, the gRPC answer and the logs, so none of them is ever
used: a failure is named from the exception *types* along its chain, plus the host and port at most.
"""

from __future__ import annotations

import errno
import http.client
import json
import re
import socket
import ssl
from enum import StrEnum

from sidecar.errors import SidecarError

__all__ = ["CONNECT_PHASE", "Failure", "ProviderError", "describe_failure", "provider_text"]

MAX_PROVIDER_TEXT = 200
# Aliyun's SignatureDoesNotMatch message goes on with "server string to sign is:" and the signed
# request, query included; everything from there on is an echo of our request.
_ECHO = re.compile(r"\s*(server\s+)?string\s*to\s*sign", re.I)
_SSL_REASON = re.compile(r"^[A-Z0-9_]{1,64}$")  # an OpenSSL mnemonic such as CERTIFICATE_VERIFY_FAILED


class Failure(StrEnum):
    DNS = "DNS lookup failed"
    REFUSED = "connection refused"
    CONNECT_TIMEOUT = "connect timeout"
    CONNECT = "connect failed"
    TLS = "TLS handshake failed"
    READ_TIMEOUT = "read timeout"
    TIMEOUT = "timed out"
    RESET = "connection reset"
    CLOSED = "connection closed before the answer"
    NETWORK = "network error"
    BAD_ANSWER = "answer is not JSON"
    OTHER = "unexpected error"


# Nothing reached the provider: a resend cannot send twice.
CONNECT_PHASE = frozenset({Failure.DNS, Failure.REFUSED, Failure.CONNECT_TIMEOUT, Failure.CONNECT})


class ProviderError(SidecarError):
    """Raised by providers instead of an SDK error: `code` is the provider's, the text is safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Checked in this order; the first kind that matches anything on the chain wins. Third-party
# classes (urllib3, requests, aiohttp) are matched by name, so this module imports none of the HTTP
# stacks the SDK loads lazily. `exact`: subclasses do not count (urllib3's NewConnectionError is a
# ConnectTimeoutError, and http.client's RemoteDisconnected a ConnectionResetError).
_Rule = tuple[Failure, tuple[type[BaseException], ...], frozenset[str], bool]
_RULES: tuple[_Rule, ...] = tuple(
    (kind, types, frozenset(names.split()), exact)
    for kind, types, names, exact in (
        (Failure.DNS, (socket.gaierror,), "NameResolutionError ClientConnectorDNSError", False),
        (Failure.REFUSED, (ConnectionRefusedError,), "", False),
        (Failure.TLS, (ssl.SSLError, ssl.CertificateError), "SSLError ClientSSLError", False),
        (Failure.CONNECT_TIMEOUT, (), "ConnectTimeoutError ConnectTimeout ConnectionTimeoutError", True),
        (Failure.CONNECT, (), "NewConnectionError ClientConnectorError", False),
        (Failure.READ_TIMEOUT, (), "ReadTimeoutError ReadTimeout SocketTimeoutError ServerTimeoutError", False),
        (Failure.CLOSED, (http.client.RemoteDisconnected,), "", True),
        (Failure.RESET, (ConnectionResetError,), "", False),
        (Failure.CLOSED, (http.client.IncompleteRead, ConnectionAbortedError, BrokenPipeError),
         "ServerDisconnectedError ProtocolError ChunkedEncodingError ClientPayloadError", False),
        (Failure.TIMEOUT, (TimeoutError,), "", False),
        (Failure.BAD_ANSWER, (json.JSONDecodeError,), "ContentTypeError", False),
        (Failure.NETWORK, (OSError,), "", False),
    )
)  # fmt: skip
_LIBRARIES = {"urllib3", "requests", "aiohttp"}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes: `__cause__`, `__context__` and the SDK's `inner_exception`."""
    found: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(found) < 32:
        item = todo.pop(0)
        if isinstance(item, BaseException) and all(item is not seen for seen in found):
            found.append(item)
            todo += [getattr(item, "inner_exception", None), item.__cause__, item.__context__]
    return found


def _matches(exc: BaseException, types: tuple[type[BaseException], ...], names: frozenset[str], exact: bool) -> bool:
    classes = (type(exc),) if exact else type(exc).__mro__
    return any(c in types or (c.__name__ in names and c.__module__.partition(".")[0] in _LIBRARIES) for c in classes)


def _kind(exc: BaseException) -> tuple[Failure, str]:
    """The failure's kind, and a detail that is a constant of some library (errno or OpenSSL name)."""
    chain = _chain(exc)
    for kind, types, names, exact in _RULES:
        hit = next((e for e in chain if _matches(e, types, names, exact)), None)
        if hit is None:
            continue
        if kind is Failure.TLS:
            ssl_error = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
            reason = getattr(ssl_error, "reason", None)
            return kind, reason if isinstance(reason, str) and _SSL_REASON.match(reason) else ""
        if kind in (Failure.CONNECT, Failure.NETWORK):
            os_error = next((e for e in chain if isinstance(e, OSError) and isinstance(e.errno, int)), None)
            return kind, _errno_name(os_error) or ("" if kind is Failure.CONNECT else type(hit).__name__)
        return kind, ""
    inner = getattr(exc, "inner_exception", None)  # the SDK's wrapper names nothing
    return Failure.OTHER, type(inner if isinstance(inner, BaseException) else exc).__name__


def _errno_name(exc: BaseException | None) -> str:
    number = getattr(exc, "errno", None)
    return errno.errorcode.get(number, "") if isinstance(number, int) else ""


def describe_failure(exc: BaseException, endpoint: str | None = None) -> tuple[Failure, str]:
    """What kind of failure `exc` is, and a text naming it and the endpoint (`host[:port]`) only.

    The text comes from the exception types and the caller's endpoint, never from an exception's own
    message, which may hold the request URL or the answer's body.
    """
    if isinstance(exc, ProviderError):
        return Failure.OTHER, provider_text(str(exc))  # built by a provider from safe parts
    kind, detail = _kind(exc)
    text = f"{kind.value} ({detail})" if detail else kind.value
    return kind, f"{endpoint}: {text}" if endpoint else text


def provider_text(message: str) -> str:
    """A provider's own message (Aliyun's `Message`), whitespace folded, without request echo, capped."""
    echo = _ECHO.search(message)
    if echo is not None:
        message = message[: echo.start()]
    message = " ".join(message.split())
    return message if len(message) <= MAX_PROVIDER_TEXT else message[: MAX_PROVIDER_TEXT - 1] + "…"
