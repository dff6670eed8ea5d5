"""A local fake of the Aliyun SMS API (dysmsapi 2017-05-25) for tests.

It speaks plain HTTP on 127.0.0.1 and verifies every request the way Aliyun's gateway does, so the real
SDK can be pointed at it::

    with FakeAliyun(credentials={"AK": "secret"}) as fake:
        client = Client(Config(access_key_id="AK", access_key_secret="secret",
                               endpoint=fake.endpoint, protocol="http"))
        client.send_sms(SendSmsRequest(...))
        [send] = fake.wait_for_sends(1)

Verification: ACS3-HMAC-SHA256 (V3, the SDK default) and the legacy HMAC-SHA1 RPC signature
(``Config(signature_algorithm="v2")``), the ±15 min clock window and nonce replay. Refusals answer with
Aliyun's gateway JSON (``{"Code", "Message", "RequestId", "HostId"}``) and are listed in
``fake.rejected`` as ``Rejection(code, reason)``; so are the fake's own business-rule refusals
(``isv.INVALID_JSON_PARAM``, ``isv.MOBILE_NUMBER_ILLEGAL``...).

Actions: ``SendSms`` (recorded in ``fake.sends`` as :class:`Send`) and ``QuerySendDetails`` (answered
from the recorded sends; mutate ``send.send_status`` / ``send.err_code`` to model a failed delivery).

Fault injection. A fault is consumed only by a request that passed verification and parameter
validation, for ``action`` (default ``"SendSms"``). Precedence: the ``fail_next`` queue, then
``fail_phone`` rules (SendSms only), then ``set_default``. The faults:

- ``BusinessError(code, message=None)``: HTTP 200, ``Code != "OK"``, no BizId; not recorded.
  ``fake.fail_next(flow_control("minute"))``, ``fake.fail_next(BusinessError("isv.AMOUNT_NOT_ENOUGH"))``
- ``GatewayError(status, code, message=None, retry_after_ms=None)``: JSON error with that status;
  ``retry_after_ms`` adds ``x-acs-retry-after``. ``fake.fail_next(GatewayError(503, "ServiceUnavailable"))``,
  ``fake.fail_next(throttling(retry_after_ms=1000))``
- ``NonJsonError(status=502, body=<html>, content_type="text/html")``: a proxy's error page.
  ``fake.fail_next(NonJsonError())``
- ``Delay(seconds)``: records the send, waits, then answers OK (a read timeout that still delivered).
  ``fake.fail_next(Delay(0.5))``
- ``Drop(accepted=False, hang=0.0)``: waits ``hang`` seconds, then closes the connection without a
  response; ``accepted=True`` records the send first. ``fake.set_default(Drop(accepted=True))``

``refused_endpoint()`` gives a ``host:port`` where nothing listens (connection refused).

Delivery receipts (SmsReport "HTTP batch push"): ``fake.receipt(send, success=False, err_code="MK:0001")``
builds the JSON item Aliyun pushes for a recorded send (and makes QuerySendDetails report the same
fate); ``push_receipts(url, [items])`` POSTs one push as Aliyun does (a JSON array, unsigned) and returns
``(status, answer)``; ``push_until_acknowledged`` retries a push Aliyun's way until it gets 200 {"code": 0}.

Provider speed, for benchmarks (constructor arguments, also attributes that may change while running;
for SendSms requests that passed verification and validation; only the request's own handler thread
waits):

- ``latency``: seconds to wait before answering, faults included (0: at once). ``FakeAliyun(latency=0.1)``
- ``drip``: when > 0, the OK answer (status line, headers and body; not a fault's) is written one byte
  every ``drip`` seconds (a provider trickling its answer; the send is recorded first). ``fake.drip = 1.0``
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import random
import re
import socket
import string
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = [
    "acknowledged",
    "BusinessError",
    "Delay",
    "Drop",
    "FakeAliyun",
    "Fault",
    "GatewayError",
    "NonJsonError",
    "push_receipts",
    "push_until_acknowledged",
    "RawRequest",
    "Rejection",
    "Send",
    "flow_control",
    "refused_endpoint",
    "send_raw",
    "throttling",
]

API_VERSION = "2017-05-25"
HOST_ID = "dysmsapi.aliyuncs.com"
# Aliyun dates SendDate/ReceiveDate in China Standard Time.
CST = timezone(timedelta(hours=8))

_MESSAGES = {
    "OK": "OK",
    "isv.BUSINESS_LIMIT_CONTROL": "触发分钟级流控Permits:1",
    "isv.DAY_LIMIT_CONTROL": "触发日发送限额",
    "isv.MOBILE_NUMBER_ILLEGAL": "非法手机号",
    "isv.MOBILE_COUNT_OVER_LIMIT": "手机号码数量超过限制",
    "isv.AMOUNT_NOT_ENOUGH": "账户余额不足",
    "isv.OUT_OF_SERVICE": "业务停机",
    "isv.INVALID_JSON_PARAM": "JSON参数不合法，只接受字符串值",
    "isv.SMS_SIGNATURE_ILLEGAL": "该账号下找不到对应签名",
    "isv.SMS_TEMPLATE_ILLEGAL": "该账号下找不到对应模板",
    "isp.SYSTEM_ERROR": "isp.SYSTEM_ERROR",
    "InternalError": "The request processing has failed due to some unknown error, exception or failure.",
    "ServiceUnavailable": "The request has failed due to a temporary failure of the server.",
    "Throttling": "Request was denied due to request throttling.",
    "Throttling.User": "Request was denied due to user flow control.",
    "Throttling.Api": "Request was denied due to api flow control.",
    "SignatureDoesNotMatch": "Specified signature is not matched with our calculation.",
    "IncompleteSignature": "The request signature does not conform to Aliyun standards.",
    "InvalidAccessKeyId.NotFound": "Specified access key is not found.",
    "InvalidTimeStamp.Expired": "Specified time stamp or date value is expired.",
    "InvalidTimeStamp.Format": "Specified time stamp or date value is not well formatted.",
    "SignatureNonceUsed": "Specified signature nonce was used already.",
    "InvalidAction.NotFound": "Specified api is not found, please check your url and method.",
    "InvalidVersion": "Specified parameter Version is not valid.",
}

_FLOW_CONTROL = {
    "minute": "触发分钟级流控Permits:1",
    "hour": "触发小时级流控Permits:5",
    "day": "触发天级流控Permits:10",
}
_PHONE_RE = re.compile(r"^\+?\d{5,20}$")
_DATE_FMT = "%Y-%m-%dT%H:%M:%SZ"


# --- faults -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BusinessError:
    """HTTP 200 with ``Code != "OK"`` and no BizId: the SDK returns it as a normal response."""

    code: str
    message: str | None = None


@dataclass(frozen=True)
class GatewayError:
    """A gateway JSON error: 4xx -> ClientException, 5xx -> ServerException, retry-after -> Throttling."""

    status: int
    code: str
    message: str | None = None
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class NonJsonError:
    """An intermediary's error page; the SDK cannot parse it and loses the status."""

    status: int = 502
    body: str = "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"
    content_type: str = "text/html"


@dataclass(frozen=True)
class Delay:
    """Accept (and record) the send, then answer OK only after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Close the connection without answering, after ``hang`` seconds; ``accepted`` records the send."""

    accepted: bool = False
    hang: float = 0.0


Fault = BusinessError | GatewayError | NonJsonError | Delay | Drop


def flow_control(level: str = "minute") -> BusinessError:
    """``isv.BUSINESS_LIMIT_CONTROL`` as Aliyun words it for the minute, hour or day window."""
    return BusinessError("isv.BUSINESS_LIMIT_CONTROL", _FLOW_CONTROL[level])


def throttling(retry_after_ms: int | None = None, status: int = 400) -> GatewayError:
    """API rate limiting; only with ``retry_after_ms`` does the SDK raise ThrottlingException."""
    return GatewayError(status, "Throttling.User", retry_after_ms=retry_after_ms)


def refused_endpoint() -> str:
    """``127.0.0.1:PORT`` where nothing listens (the port was just released, so connects are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# --- records ------------------------------------------------------------------------------------------


@dataclass
class Send:
    """One SendSms that Aliyun accepted (answered OK, or accepted before a Delay/Drop(accepted=True))."""

    phone_numbers: str
    sign_name: str
    template_code: str
    template_param: dict[str, str]
    out_id: str | None
    biz_id: str
    request_id: str
    received_at: float  # time.time() as seen by the fake's clock
    access_key_id: str = ""
    signature_version: str = "v3"
    # What QuerySendDetails reports; tests may change them to model a failed or pending delivery.
    send_status: int = 3
    err_code: str = "DELIVERED"
    content: str = ""

    @property
    def phones(self) -> list[str]:
        return [p.strip() for p in self.phone_numbers.split(",") if p.strip()]


class Rejection(NamedTuple):
    code: str
    reason: str


@dataclass(frozen=True)
class RawRequest:
    """A request exactly as received, for replaying or tampering in tests."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def with_query_param(self, name: str, value: str) -> RawRequest:
        """A copy with one query parameter replaced (the signature is left as it was)."""
        path, _, query = self.target.partition("?")
        pairs = [(k, value if k == name else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        new_query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
        return RawRequest(self.method, f"{path}?{new_query}", self.headers, self.body)


def send_raw(endpoint: str, raw: RawRequest, timeout: float = 5.0) -> tuple[int, Any]:
    """Send ``raw`` byte-for-byte (same headers, same Host) and return (status, parsed JSON or text)."""
    host, _, port = endpoint.rpartition(":")
    conn = HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(raw.method, raw.target, skip_host=True, skip_accept_encoding=True)
        for name, value in raw.headers:
            if name.lower() != "content-length":
                conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(raw.body)))
        conn.endheaders(raw.body)
        return _answer_of(conn)
    finally:
        conn.close()


def _answer_of(conn: HTTPConnection) -> tuple[int, Any]:
    resp = conn.getresponse()
    data = resp.read().decode("utf-8")
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def push_receipts(url: str, receipts: list[dict[str, Any]] | bytes, timeout: float = 10.0) -> tuple[int, Any]:
    """One SmsReport batch push to ``url``, as Aliyun makes it: POST, a JSON array, no signature.
    ``receipts`` may be raw bytes, for malformed pushes. Returns (status, parsed JSON or text)."""
    parts = urlsplit(url)
    body = receipts if isinstance(receipts, bytes) else json.dumps(receipts, ensure_ascii=False).encode("utf-8")
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/json;charset=utf-8"})
        return _answer_of(conn)
    finally:
        conn.close()


def acknowledged(answer: tuple[int, Any]) -> bool:
    """What Aliyun checks of the answer to a push: HTTP 200 and a numeric `code`."""
    status, body = answer
    return status == 200 and isinstance(body, dict) and isinstance(body.get("code"), int)


def push_until_acknowledged(
    url: str, receipts: list[dict[str, Any]], schedule: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
) -> list[tuple[int, Any]]:
    """Aliyun's retries (after 1, 5 and 10 minutes; ``schedule`` here, in seconds, the first at once):
    pushes until acknowledged or the schedule ends; every answer, in order."""
    answers = []
    for wait in schedule:
        time.sleep(wait)
        answers.append(push_receipts(url, receipts))
        if acknowledged(answers[-1]):
            break
    return answers


# --- internals ----------------------------------------------------------------------------------------


def _enc(value: str) -> str:
    # RFC 3986: only A-Z a-z 0-9 - _ . ~ stay literal (quote always keeps "_.-~").
    return quote(value, safe="", encoding="utf-8")


def _canonical_query(pairs: list[tuple[str, str]]) -> str:
    encoded = sorted((_enc(k), _enc(v)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


class _Reject(Exception):
    def __init__(self, status: int, code: str, reason: str, message: str | None = None) -> None:
        super().__init__(f"{status} {code}: {reason}")
        self.status = status
        self.code = code
        self.reason = reason
        self.message = message or _MESSAGES.get(code, reason)


class _BusinessReject(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass
class _Incoming:
    method: str
    target: str
    path: str
    query: list[tuple[str, str]]
    headers: Message
    body: bytes
    # Filled in by verification.
    params: dict[str, str] = field(default_factory=dict)
    action: str = ""
    access_key_id: str = ""
    signature_version: str = ""

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else str(value)


@dataclass
class _Rule:
    fault: Fault
    remaining: int | None  # None: forever
    action: str = "SendSms"


class _Server(ThreadingHTTPServer):
    # Bursts of connects overflow the default backlog of 5 and cost ~1 s in SYN retransmits.
    request_queue_size = 128
    daemon_threads = True
    fake: FakeAliyun

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out and go away are expected; anything else is kept for the test to see.
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, ConnectionError | TimeoutError):
            self.fake._record_error(exc)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests.Session expects
    # Without this, headers and body leave in two segments and a keep-alive client stalls ~40 ms per call.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fake._track_connection(self.connection, opened=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track_connection(self.connection, opened=False)

    def do_POST(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        fake = self.server.fake
        try:
            body = self._read_body()
            path, _, query = self.path.partition("?")
            incoming = _Incoming(
                method=self.command,
                target=self.path,
                path=path,
                query=parse_qsl(query, keep_blank_values=True, encoding="utf-8"),
                headers=self.headers,
                body=body,
            )
            fake._on_request(RawRequest(self.command, self.path, tuple(self.headers.items()), body))
            fake._handle(self, incoming)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # a bug in the fake: keep it visible instead of hanging the client
            fake._record_error(exc)
            self.close_connection = True
            try:
                self.send_json(500, {"Code": "InternalError", "Message": f"fake_aliyun bug: {exc!r}"})
            except OSError:
                pass

    def send_body(self, status: int, body: bytes, content_type: str, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def send_json(self, status: int, obj: Mapping[str, Any], extra: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        headers = {"x-acs-request-id": str(obj.get("RequestId", "")), **(extra or {})}
        self.send_body(status, body, "application/json;charset=utf-8", headers)

    def drip_json(self, status: int, obj: Mapping[str, Any], interval: float, stop: threading.Event) -> None:
        """The answer of ``send_json``, written one byte every ``interval`` seconds until done or ``stop``."""
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        head = (
            f"{self.protocol_version} {status} {self.responses[status][0]}\r\n"
            f"Content-Type: application/json;charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"x-acs-request-id: {obj.get('RequestId', '')}\r\n\r\n"
        )
        for i, byte in enumerate(head.encode("latin-1") + body):
            if i and stop.wait(interval):
                self.close_connection = True
                return
            self.wfile.write(bytes([byte]))


# --- the fake -----------------------------------------------------------------------------------------


class FakeAliyun:
    """A threaded fake Aliyun SMS endpoint; see the module docstring."""

    def __init__(
        self,
        credentials: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        max_clock_skew: float = 15 * 60,
        templates: Mapping[str, str] | None = None,
        latency: float = 0.0,
        drip: float = 0.0,
    ) -> None:
        """``credentials`` maps AccessKeyId -> AccessKeySecret; ``clock`` is the server's wall clock
        (shift it to provoke InvalidTimeStamp.Expired); ``templates`` maps TemplateCode -> text with
        ``${var}`` placeholders, used for QuerySendDetails' Content."""
        self.credentials: dict[str, str] = dict(credentials or {"test-ak": "test-secret"})
        self._host = host
        self._port = port
        self._clock = clock
        self._max_skew = max_clock_skew
        self._templates = dict(templates or {})
        self.latency = latency  # seconds before each SendSms answer; see the module docstring
        self.drip = drip  # seconds between the bytes of each OK SendSms answer; 0: written at once

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sends: list[Send] = []
        self._rejected: list[Rejection] = []
        self._captured: list[RawRequest] = []
        self._queries: list[tuple[float, dict[str, str]]] = []
        self._errors: list[BaseException] = []
        self._requests_seen = 0
        self._connections_seen = 0
        self._open: set[socket.socket] = set()
        self._nonces: dict[tuple[str, str], float] = {}
        self._prune_at = 4096
        self._queue: list[_Rule] = []
        self._phone_rules: dict[str, _Rule] = {}
        self._defaults: dict[str, Fault] = {}
        self._biz_seq = itertools.count(random.randrange(10**14, 9 * 10**14))

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # lifecycle

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), _Handler)
        server.fake = self
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-aliyun", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in Delay/Drop
        server.shutdown()
        # Keep-alive handler threads block reading their socket forever; cut them loose.
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # addresses

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeAliyun is not running")
        port: int = self._server.server_address[1]
        return port

    @property
    def endpoint(self) -> str:
        """``host:port``, for ``Config(endpoint=fake.endpoint, protocol="http")``."""
        return f"{self._host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def config_kwargs(self, access_key_id: str | None = None) -> dict[str, str]:
        """Keyword arguments for ``alibabacloud_tea_openapi.models.Config`` pointing at this fake."""
        ak = access_key_id or next(iter(self.credentials))
        return {
            "access_key_id": ak,
            "access_key_secret": self.credentials[ak],
            "endpoint": self.endpoint,
            "protocol": "http",
        }

    # observations

    @property
    def sends(self) -> list[Send]:
        """A snapshot of the accepted sends, oldest first."""
        with self._lock:
            return list(self._sends)

    @property
    def queries(self) -> list[tuple[float, dict[str, str]]]:
        """Each valid QuerySendDetails: (time.monotonic() on arrival, its parameters)."""
        with self._lock:
            return list(self._queries)

    @property
    def rejected(self) -> list[Rejection]:
        """Requests the fake refused itself (signature, timestamp, nonce, parameters, business rules)."""
        with self._lock:
            return list(self._rejected)

    @property
    def captured(self) -> list[RawRequest]:
        """Every request as received, for replay (:func:`send_raw`) and tampering."""
        with self._lock:
            return list(self._captured)

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions inside the fake; a test may assert this stays empty."""
        with self._lock:
            return list(self._errors)

    @property
    def requests_seen(self) -> int:
        """Requests that reached the server, verified or not, faulted or not."""
        with self._lock:
            return self._requests_seen

    @property
    def connections_seen(self) -> int:
        """TCP connections accepted, to check the client's keep-alive behaviour."""
        with self._lock:
            return self._connections_seen

    def wait_for_sends(self, n: int, timeout: float = 5.0) -> list[Send]:
        """Block until at least ``n`` sends were recorded; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._sends) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected at least {n} sends within {timeout}s, got {len(self._sends)}; "
                        f"rejected={self._rejected!r}"
                    )
                self._cond.wait(left)
            return list(self._sends)

    def reset(self) -> None:
        """Forget sends, rejections, captures, counters and faults (credentials and nonces stay)."""
        with self._lock:
            self._sends.clear()
            self._rejected.clear()
            self._captured.clear()
            self._queries.clear()
            self._errors.clear()
            self._requests_seen = 0
            self._connections_seen = 0
        self.clear_faults()

    # delivery receipts

    def receipt(
        self,
        send: Send,
        *,
        success: bool = True,
        err_code: str | None = None,
        err_msg: str | None = None,
        after: float = 2.0,
    ) -> dict[str, Any]:
        """The SmsReport item Aliyun pushes for ``send``, reported ``after`` seconds after it was sent;
        QuerySendDetails reports the same from now on."""
        code = err_code or ("DELIVERED" if success else "MK:0001")
        send.send_status, send.err_code = (3 if success else 2), code
        return {
            "phone_number": send.phones[0],
            "send_time": _cst(send.received_at),
            "report_time": _cst(send.received_at + after),
            "success": success,
            "err_code": code,
            "err_msg": err_msg if err_msg is not None else ("用户接收成功" if success else "用户关机或不在服务区"),
            "sms_size": "1",
            "biz_id": send.biz_id,
            "out_id": send.out_id or "",
        }

    # fault injection

    def fail_next(self, fault: Fault, times: int = 1, *, action: str = "SendSms") -> None:
        """Apply ``fault`` to the next ``times`` valid requests for ``action`` (queued after earlier ones)."""
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._queue.append(_Rule(fault, times, action))

    def set_default(self, fault: Fault | None, *, action: str = "SendSms") -> None:
        """Apply ``fault`` to every valid request for ``action`` not otherwise scripted; None clears it."""
        with self._lock:
            if fault is None:
                self._defaults.pop(action, None)
            else:
                self._defaults[action] = fault

    def fail_phone(self, phone: str, fault: Fault | None, times: int | None = None) -> None:
        """Apply ``fault`` to SendSms requests including ``phone`` (``+`` ignored); None clears the rule."""
        key = phone.lstrip("+")
        with self._lock:
            if fault is None:
                self._phone_rules.pop(key, None)
            else:
                self._phone_rules[key] = _Rule(fault, times)

    def clear_faults(self) -> None:
        with self._lock:
            self._queue.clear()
            self._phone_rules.clear()
            self._defaults.clear()

    def _take_fault(self, action: str, phones: list[str]) -> Fault | None:
        with self._lock:
            for i, rule in enumerate(self._queue):
                if rule.action == action:
                    assert rule.remaining is not None
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        del self._queue[i]
                    return rule.fault
            if action == "SendSms":
                for phone in phones:
                    prule = self._phone_rules.get(phone.lstrip("+"))
                    if prule is not None:
                        if prule.remaining is not None:
                            prule.remaining -= 1
                            if prule.remaining <= 0:
                                del self._phone_rules[phone.lstrip("+")]
                        return prule.fault
            return self._defaults.get(action)

    # bookkeeping called from handler threads

    def _on_request(self, raw: RawRequest) -> None:
        with self._lock:
            self._requests_seen += 1
            self._captured.append(raw)

    def _track_connection(self, conn: socket.socket, *, opened: bool) -> None:
        with self._lock:
            if opened:
                self._connections_seen += 1
                self._open.add(conn)
            else:
                self._open.discard(conn)

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _reject(self, code: str, reason: str) -> None:
        with self._lock:
            self._rejected.append(Rejection(code, reason))

    def _record_send(self, send: Send) -> None:
        with self._cond:
            self._sends.append(send)
            self._cond.notify_all()

    # request handling

    def _handle(self, h: _Handler, req: _Incoming) -> None:
        request_id = _request_id()
        try:
            self._verify(req)
            if req.action == "SendSms":
                self._send_sms(h, req, request_id)
            elif req.action == "QuerySendDetails":
                self._query_send_details(h, req, request_id)
            else:
                raise _Reject(404, "InvalidAction.NotFound", f"unknown action {req.action!r}")
        except _Reject as rej:
            self._reject(rej.code, rej.reason)
            body = {"RequestId": request_id, "HostId": HOST_ID, "Code": rej.code, "Message": rej.message}
            h.send_json(rej.status, body)
        except _BusinessReject as rej:
            self._reject(rej.code, rej.reason)
            message = _MESSAGES.get(rej.code, rej.reason)
            h.send_json(200, {"Code": rej.code, "Message": message, "RequestId": request_id})

    def _verify(self, req: _Incoming) -> None:
        form: list[tuple[str, str]] = []
        content_type = (req.header("content-type") or "").lower()
        if req.body and content_type.startswith("application/x-www-form-urlencoded"):
            form = parse_qsl(req.body.decode("utf-8"), keep_blank_values=True)
        if req.header("authorization") is not None:
            self._verify_v3(req)
            params = dict(req.query + form)
            req.action = req.header("x-acs-action") or ""
            version = req.header("x-acs-version") or ""
        elif any(k == "Signature" for k, _ in req.query + form):
            self._verify_v2(req, req.query + form)
            params = dict(req.query + form)
            req.action = params.get("Action", "")
            version = params.get("Version", "")
        else:
            raise _Reject(400, "IncompleteSignature", "neither an Authorization header nor a Signature")
        if not req.action:
            raise _Reject(400, "MissingAction", "no action", "Action is mandatory for this request.")
        if version != API_VERSION:
            raise _Reject(400, "InvalidVersion", f"version {version!r}")
        req.params = params

    def _check_time(self, value: str | None, what: str) -> None:
        if not value:
            raise _Reject(400, "InvalidTimeStamp.Format", f"{what} missing")
        try:
            stamp = datetime.strptime(value, _DATE_FMT).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise _Reject(400, "InvalidTimeStamp.Format", f"{what} {value!r}") from None
        skew = stamp - self._clock()
        if abs(skew) > self._max_skew:
            raise _Reject(400, "InvalidTimeStamp.Expired", f"{what} {value} is {skew:+.0f}s off")

    def _use_nonce(self, ak: str, nonce: str | None) -> None:
        if not nonce:
            raise _Reject(400, "MissingSignatureNonce", "no nonce", "SignatureNonce is mandatory.")
        now = self._clock()
        with self._lock:
            if (ak, nonce) in self._nonces:
                raise _Reject(400, "SignatureNonceUsed", f"nonce {nonce} replayed")
            # Expired nonces can go: a replay that old fails the timestamp check anyway. Pruning only
            # when the table has doubled keeps the cost per request flat under load.
            if len(self._nonces) >= self._prune_at:
                self._nonces = {k: t for k, t in self._nonces.items() if t > now}
                self._prune_at = max(4096, 2 * len(self._nonces))
            self._nonces[(ak, nonce)] = now + 2 * self._max_skew

    def _verify_v3(self, req: _Incoming) -> None:
        auth = (req.header("authorization") or "").strip()
        algorithm, _, rest = auth.partition(" ")
        if algorithm != "ACS3-HMAC-SHA256":
            raise _Reject(400, "IncompleteSignature", f"algorithm {algorithm!r} not supported")
        parts: dict[str, str] = {}
        for item in rest.split(","):
            name, sep, value = item.strip().partition("=")
            if sep:
                parts[name.strip()] = value.strip()
        ak, signed, signature = (parts.get(k, "") for k in ("Credential", "SignedHeaders", "Signature"))
        if not (ak and signed and signature):
            raise _Reject(400, "IncompleteSignature", f"Authorization lacks fields: {auth!r}")
        secret = self.credentials.get(ak)
        if secret is None:
            raise _Reject(404, "InvalidAccessKeyId.NotFound", f"unknown AccessKeyId {ak!r}")

        declared = (req.header("x-acs-content-sha256") or "").strip().lower()
        actual = hashlib.sha256(req.body).hexdigest()
        if not hmac.compare_digest(declared.encode(), actual.encode()):
            raise _Reject(400, "SignatureDoesNotMatch", "body does not match x-acs-content-sha256")

        signed_list = signed.split(";")
        present = {name.lower() for name in req.headers}
        required = {"host"} | {name for name in present if name.startswith("x-acs-")}
        if req.body:
            required.add("content-type")
        if unsigned := sorted(required - set(signed_list)):
            raise _Reject(400, "IncompleteSignature", f"headers not signed: {unsigned}")
        if absent := [name for name in signed_list if name not in present]:
            raise _Reject(400, "IncompleteSignature", f"signed headers absent: {absent}")

        canonical_headers = "".join(
            f"{name}:{','.join(sorted(str(v).strip() for v in req.headers.get_all(name, [])))}\n"
            for name in signed_list
        )
        canonical_request = "\n".join(
            [
                req.method,
                quote(unquote(req.path) or "/", safe="/~"),
                _canonical_query(req.query),
                canonical_headers,
                signed,
                actual,
            ]
        )
        digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
        string_to_sign = f"ACS3-HMAC-SHA256\n{digest}"
        expected = hmac.new(secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest().encode(), signature.lower().encode()):
            raise _Reject(400, "SignatureDoesNotMatch", f"V3 mismatch; canonical={canonical_request!r}")

        self._check_time(req.header("x-acs-date"), "x-acs-date")
        self._use_nonce(ak, req.header("x-acs-signature-nonce"))
        req.access_key_id = ak
        req.signature_version = "v3"

    def _verify_v2(self, req: _Incoming, pairs: list[tuple[str, str]]) -> None:
        params = dict(pairs)
        signature = params.get("Signature", "")
        ak = params.get("AccessKeyId", "")
        if not ak:
            raise _Reject(400, "MissingAccessKeyId", "no AccessKeyId", "AccessKeyId is mandatory.")
        secret = self.credentials.get(ak)
        if secret is None:
            raise _Reject(404, "InvalidAccessKeyId.NotFound", f"unknown AccessKeyId {ak!r}")
        if params.get("SignatureMethod") != "HMAC-SHA1":
            raise _Reject(400, "IncompleteSignature", f"SignatureMethod {params.get('SignatureMethod')!r}")
        canonical = _canonical_query([(k, v) for k, v in pairs if k != "Signature"])
        string_to_sign = f"{req.method}&{_enc('/')}&{_enc(canonical)}"
        mac = hmac.new(f"{secret}&".encode(), string_to_sign.encode("utf-8"), hashlib.sha1)
        expected = base64.b64encode(mac.digest())
        if not hmac.compare_digest(expected, signature.encode("utf-8")):
            raise _Reject(400, "SignatureDoesNotMatch", f"V2 signature mismatch; string={string_to_sign!r}")
        self._check_time(params.get("Timestamp"), "Timestamp")
        self._use_nonce(ak, params.get("SignatureNonce"))
        req.access_key_id = ak
        req.signature_version = "v2"

    # actions

    def _send_sms(self, h: _Handler, req: _Incoming, request_id: str) -> None:
        p = req.params
        _require(p, "PhoneNumbers", "SignName", "TemplateCode")
        phones = [x.strip() for x in p["PhoneNumbers"].split(",") if x.strip()]
        if len(phones) > 1000:
            raise _BusinessReject("isv.MOBILE_COUNT_OVER_LIMIT", f"{len(phones)} numbers")
        bad = [x for x in phones if not _PHONE_RE.match(x)]
        if bad or not phones:
            raise _BusinessReject("isv.MOBILE_NUMBER_ILLEGAL", f"PhoneNumbers {p['PhoneNumbers']!r}")
        template_param: dict[str, str] = {}
        if raw_param := p.get("TemplateParam"):
            try:
                parsed = json.loads(raw_param)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
                raise _BusinessReject("isv.INVALID_JSON_PARAM", f"TemplateParam {raw_param!r}")
            template_param = parsed

        send = Send(
            phone_numbers=p["PhoneNumbers"],
            sign_name=p["SignName"],
            template_code=p["TemplateCode"],
            template_param=template_param,
            out_id=p.get("OutId"),
            biz_id=f"{next(self._biz_seq)}^0",
            request_id=request_id,
            received_at=self._clock(),
            access_key_id=req.access_key_id,
            signature_version=req.signature_version,
        )
        send.content = self._render(send)
        ok = {"Code": "OK", "Message": "OK", "BizId": send.biz_id, "RequestId": request_id}

        if self.latency > 0:
            self._stopping.wait(self.latency)
        fault = self._take_fault("SendSms", phones)
        if fault is None and self.drip > 0:
            self._record_send(send)
            h.drip_json(200, ok, self.drip, self._stopping)
        elif fault is None:
            self._record_send(send)
            h.send_json(200, ok)
        elif isinstance(fault, Delay):
            self._record_send(send)  # accepted upstream; only the answer is late
            self._stopping.wait(fault.seconds)
            h.send_json(200, ok)
        elif isinstance(fault, Drop) and fault.accepted:
            self._record_send(send)
            self._drop(h, fault)
        else:
            self._apply_fault(h, fault, request_id)

    def _query_send_details(self, h: _Handler, req: _Incoming, request_id: str) -> None:
        p = req.params
        _require(p, "PhoneNumber", "SendDate", "PageSize", "CurrentPage")
        try:
            day = datetime.strptime(p["SendDate"], "%Y%m%d").date()
            page_size, page = int(p["PageSize"]), int(p["CurrentPage"])
        except ValueError as exc:
            raise _Reject(400, "InvalidParameter", str(exc), "Specified parameter is not valid.") from None
        if not 1 <= page_size <= 50 or page < 1:
            raise _Reject(400, "InvalidParameter", f"PageSize={page_size} CurrentPage={page}")

        with self._lock:
            self._queries.append((time.monotonic(), dict(p)))
        fault = self._take_fault("QuerySendDetails", [])
        if fault is not None and not isinstance(fault, Delay):
            if isinstance(fault, Drop):
                self._drop(h, fault)
            else:
                self._apply_fault(h, fault, request_id)
            return
        if isinstance(fault, Delay):
            self._stopping.wait(fault.seconds)

        phone = p["PhoneNumber"].lstrip("+")
        matches = [
            s
            for s in reversed(self.sends)  # newest first
            if phone in (x.lstrip("+") for x in s.phones)
            and datetime.fromtimestamp(s.received_at, CST).date() == day
            and (not p.get("BizId") or s.biz_id == p["BizId"])
        ]
        window = matches[(page - 1) * page_size : page * page_size]
        dtos = [
            {
                "PhoneNum": phone,
                "SendStatus": s.send_status,
                "ErrCode": s.err_code,
                "TemplateCode": s.template_code,
                "Content": s.content,
                "SendDate": _cst(s.received_at),
                "ReceiveDate": _cst(s.received_at + 1) if s.send_status == 3 else "",
                "OutId": s.out_id or "",
            }
            for s in window
        ]
        h.send_json(
            200,
            {
                "Code": "OK",
                "Message": "OK",
                "RequestId": request_id,
                "TotalCount": len(matches),
                "SmsSendDetailDTOs": {"SmsSendDetailDTO": dtos},
            },
        )

    def _render(self, send: Send) -> str:
        template = self._templates.get(send.template_code)
        if template is None:
            text = f"{send.template_code} {json.dumps(send.template_param, ensure_ascii=False)}"
        else:
            text = string.Template(template).safe_substitute(send.template_param)
        return f"【{send.sign_name}】{text}"

    def _drop(self, h: _Handler, fault: Drop) -> None:
        if fault.hang:
            self._stopping.wait(fault.hang)
        h.close_connection = True  # BaseHTTPRequestHandler then closes the socket without a byte sent

    def _apply_fault(self, h: _Handler, fault: Fault, request_id: str) -> None:
        if isinstance(fault, BusinessError):
            message = fault.message or _MESSAGES.get(fault.code, fault.code)
            h.send_json(200, {"Code": fault.code, "Message": message, "RequestId": request_id})
        elif isinstance(fault, GatewayError):
            extra = {} if fault.retry_after_ms is None else {"x-acs-retry-after": str(fault.retry_after_ms)}
            message = fault.message or _MESSAGES.get(fault.code, fault.code)
            body = {"RequestId": request_id, "HostId": HOST_ID, "Code": fault.code, "Message": message}
            h.send_json(fault.status, body, extra)
        elif isinstance(fault, NonJsonError):
            h.close_connection = True  # proxies usually close after an error page
            h.send_body(fault.status, fault.body.encode("utf-8"), fault.content_type, {"Connection": "close"})
        elif isinstance(fault, Drop):
            self._drop(h, fault)
        else:  # Delay is handled by the action itself
            raise TypeError(f"unknown fault {fault!r}")


def _require(params: Mapping[str, str], *names: str) -> None:
    for name in names:
        if not params.get(name):
            raise _Reject(400, f"Missing{name}", f"{name} missing", f"{name} is mandatory for this action.")


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _cst(ts: float) -> str:
    return datetime.fromtimestamp(ts, CST).strftime("%Y-%m-%d %H:%M:%S")
