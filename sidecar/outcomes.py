"""What a send can end as: the words Python and SQL exchange about it.

`Outcome` is what the ledger records (sms.finish_delivery decides the message's fate from it);
`Kind` is what went wrong, for whoever is waiting: the hook turns it into GoTrue's answer and the
user's text, gRPC into a status code. Providers set both. The codes below are the ones of our own
that travel as `provider_code` beside the provider's (Aliyun's `isv.*`, `isp.*`, gateway codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "BAD_GATEWAY", "BUSY", "CLIENT_ERROR", "CODE_LENGTH_UNSUPPORTED", "CONCURRENT_REQUEST", "CONNECT_FAILED",
    "DATABASE_UNAVAILABLE", "EMPTY_RESPONSE", "EXPIRED", "NO_INTERNATIONAL_TEMPLATE", "NO_RESPONSE", "NO_TIME_LEFT",
    "OK", "RECONCILED", "RECONCILE_FAILED", "SHUTDOWN_DURING_SEND", "TEST_NUMBER", "WORKER_ERROR", "Kind", "Outcome",
    "SendResult", "stored_result",
]  # fmt: skip

# Written by the sidecar.
OK = "OK"  # the provider took it (Aliyun's own code for success, kept as is)
NO_RESPONSE = "NoResponse"  # sent, but no answer came back: it may have gone out (SQL reads it too)
CONNECT_FAILED = "ConnectFailed"  # nothing reached the provider
BAD_GATEWAY = "BadGateway"  # an answer that is not the API's (a proxy's error page)
CLIENT_ERROR = "ClientError"  # the request could not be built or signed: a bug on our side
EMPTY_RESPONSE = "EmptyResponse"  # an answer without a Code
NO_INTERNATIONAL_TEMPLATE = "NoInternationalTemplate"
CODE_LENGTH_UNSUPPORTED = "CodeLengthUnsupported"
RECONCILED = "RECONCILED"  # an ambiguous attempt the provider's records show as sent
RECONCILE_FAILED = "ReconcileFailed"  # the provider's records could not be read
BUSY = "Busy"  # every send slot of this sidecar is taken
NO_TIME_LEFT = "NoTimeLeft"  # the hook's budget was spent before sending
DATABASE_UNAVAILABLE = "DatabaseUnavailable"
WORKER_ERROR = "WorkerError"  # the provider raised (a bug): the send may have happened
SHUTDOWN_DURING_SEND = "ShutdownDuringSend"
# Written by SQL.
CONCURRENT_REQUEST = "concurrent_request"  # a refusal (503): another transaction held the same limit lock
EXPIRED = "EXPIRED"  # the code expired before it could be delivered
TEST_NUMBER = "TEST_NUMBER"  # a number of sms.settings.test_codes: recorded as sent, never texted


class Outcome(StrEnum):
    """The ledger's outcomes (sms.finish_delivery)."""

    ACCEPTED = "accepted"  # the provider took it; delivery is asynchronous
    REJECTED = "rejected"  # permanent: bad number, template or configuration; never resend
    RETRY = "retry"  # transient and known not sent (or refused): safe to try again later
    AMBIGUOUS = "ambiguous"  # may have been sent (read timeout, dropped reply): reconcile first


class Kind(StrEnum):
    """What went wrong, as the person waiting for the code should learn it."""

    BAD_NUMBER = "bad_number"  # this number cannot receive codes
    RATE_LIMITED = "rate_limited"  # too many codes for this number; `retry_after` says for how long
    PROVIDER_ERROR = "provider_error"  # the provider (or a proxy before it) failed: try again
    UNAVAILABLE = "unavailable"  # not reached, busy or over a cap: try again later
    TIMEOUT = "timeout"  # no answer in time; the SMS may still arrive
    NEEDS_OPERATOR = "needs_operator"  # configuration, credentials, balance, a bug: resending cannot help


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    code: str  # the provider's result code (e.g. OK, isv.BUSINESS_LIMIT_CONTROL) or one of ours above
    message: str = ""
    biz_id: str | None = None
    request_id: str | None = None
    kind: Kind | None = None  # None when accepted
    retry_after: int | None = None  # seconds, when the provider says how long to wait
    connect_failure: bool = False  # nothing reached the provider, so resending cannot duplicate
    alert: bool = False  # an operator must act (credentials, balance, sign or template)

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED


# Our own codes as they read back from the ledger; anything else is for an operator to look at.
_STORED = {NO_RESPONSE: Kind.TIMEOUT, CONNECT_FAILED: Kind.UNAVAILABLE, BAD_GATEWAY: Kind.PROVIDER_ERROR,
           EXPIRED: Kind.TIMEOUT}  # fmt: skip


def stored_result(code: str, message: str) -> SendResult:
    """A failed message's stored code and text (sms.message_state) read back as a result. Providers
    read their own codes first (`Provider.classify`) and hand the rest here."""
    return SendResult(Outcome.REJECTED, code, message, kind=_STORED.get(code, Kind.NEEDS_OPERATOR))
