"""When Aliyun cannot be reached, nothing of the request leaks: not the phone number, not the code.

The HTTP stacks under the Aliyun SDK quote the request URL (`/?PhoneNumbers=…&TemplateParam={"code":…}`)
in their error texts. The real provider and SDK are pointed here at real failures on loopback (a closed
port, an unresolvable name, a full accept queue, TLS against plain text or a bad certificate, a reset
mid-answer), and every place a failure reaches is read: sms.outbox.last_error,
sms.deliveries.provider_message, public.phone_code_status as the requesting user, the hook's and the
gRPC SendSMS answers, the `sidecar` logs and the metrics. Each must name the kind of error and the host
and port, and nothing else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.app import create_app
from sidecar.config import AliyunConfig, Config, GrpcConfig, WorkerConfig
from sidecar.grpc_api import phonenumberservice_pb2 as pb, phonenumberservice_pb2_grpc as pb_grpc
from sidecar.logs import JsonFormatter
from sidecar.outcomes import SendResult
from sidecar.providers.aliyun import AliyunProvider
from sidecar.providers.base import Sms
from sidecar.webhook import parse_secrets
from tests.support.aliyun import aliyun_config as support_aliyun_config
from tests.support.builders import fresh_phone
from tests.support.database import Database, drain_queue
from tests.support.fake_aliyun import BusinessError, FakeAliyun, GatewayError, NonJsonError, refused_endpoint
from tests.support.gotrue import GoTrueHookCaller, generate_secret, otp_login
from tests.support.postgrest import PostgREST, user
from tests.support.servers import free_port, run_app, sidecar_url, wait_until

HOOK_SECRET = generate_secret()
GRPC_TOKEN = "errors-test-token-3b9f61c2d8"
# What an SDK error text carries besides the number and the code: the query string.
REQUEST_TEXT = ("TemplateParam", "PhoneNumbers", "PhoneNumber=", "?", "%7B", "code%22")


@pytest.fixture(autouse=True)
def _isolated(database: Database, settings: Any) -> None:
    drain_queue(database)
    settings(resend_cooldown_seconds=None, daily_limit_per_phone=None, hourly_limit_per_user=None,
             hourly_limit_per_ip=None)  # fmt: skip


# --- failing endpoints on loopback ------------------------------------------------------------------------


class RawServer:
    """A loopback TCP listener running `handle(connection, server)` per connection, in threads."""

    def __init__(self, handle: Callable[[socket.socket, RawServer], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self._handle = handle
        self._thread = threading.Thread(target=self._serve, name="raw-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                self._handle(conn, self)
            except OSError:  # the client gave up (a TLS alert, a timeout): nothing to do
                pass

    def stop_listening(self) -> None:
        """From now on connecting is refused."""
        # close() alone leaves the socket listening while another thread is blocked in accept().
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def close(self) -> None:
        self.stop_listening()
        self._thread.join(5)


@contextmanager
def raw_server(handle: Callable[[socket.socket, RawServer], None]) -> Iterator[RawServer]:
    server = RawServer(handle)
    try:
        yield server
    finally:
        server.close()


def read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    length = re.search(rb"(?im)^content-length:\s*(\d+)", data)
    body = data.split(b"\r\n\r\n", 1)[1]
    while length and len(body) < int(length.group(1)):
        body += conn.recv(65536)


def reset_mid_answer(conn: socket.socket, server: RawServer) -> None:
    """Read the request, start a 200 answer, then abort the connection with a RST (SO_LINGER 0)."""
    read_request(conn)
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"Code": "O')
    time.sleep(0.1)  # the client has the headers and waits for the rest of the body
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def plain_http(conn: socket.socket, server: RawServer) -> None:
    """An endpoint configured for https that answers the TLS ClientHello in plain text."""
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@contextmanager
def closed_port() -> Iterator[tuple[str, str]]:
    yield refused_endpoint(), "http"


@contextmanager
def unresolvable() -> Iterator[tuple[str, str]]:
    yield "nonexistent.invalid", "http"  # RFC 2606: never resolves, and fails without a network


@contextmanager
def full_backlog() -> Iterator[tuple[str, str]]:
    """A listener that never accepts, its accept queue (backlog 0: one connection) already taken.

    Linux drops the SYNs of further connections, so a connect times out, deterministically and offline.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        with socket.create_connection(listener.getsockname(), timeout=2):
            time.sleep(0.05)
            yield f"127.0.0.1:{listener.getsockname()[1]}", "http"


@contextmanager
def tls_to_plain_text() -> Iterator[tuple[str, str]]:
    with raw_server(plain_http) as server:
        yield server.endpoint, "https"


@contextmanager
def tls_with_an_untrusted_certificate() -> Iterator[tuple[str, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)

        def handshake(conn: socket.socket, server: RawServer) -> None:
            with context.wrap_socket(conn, server_side=True) as tls:  # the client refuses the certificate
                read_request(tls)

        with raw_server(handshake) as server:
            yield server.endpoint, "https"


@contextmanager
def resetting_server() -> Iterator[tuple[str, str]]:
    with raw_server(reset_mid_answer) as server:
        yield server.endpoint, "http"


@dataclass(frozen=True)
class Case:
    name: str
    endpoint: Callable[[], Any]  # a context manager of (host[:port], protocol)
    kind: str  # what the message must say
    provider_code: str  # how the outcome is classified (unchanged by the sanitising)


CASES = [
    Case("refused", closed_port, "connection refused", "ConnectFailed"),
    Case("dns", unresolvable, "DNS lookup failed", "ConnectFailed"),
    Case("connect-timeout", full_backlog, "connect timeout", "ConnectFailed"),
    # The handshake fails before the request leaves: nothing can have been sent, so it is safe to retry.
    Case("tls-plain-text", tls_to_plain_text, "TLS handshake failed", "ConnectFailed"),
    Case("tls-bad-certificate", tls_with_an_untrusted_certificate, "TLS handshake failed", "ConnectFailed"),
    Case("reset-mid-answer", resetting_server, "connection reset | connection closed before the answer", "NoResponse"),
]


# --- running the sidecar and collecting what it left behind -----------------------------------------------


def aliyun_config(endpoint: str, protocol: str) -> AliyunConfig:
    return support_aliyun_config(endpoint, protocol=protocol)


def sidecar(database: Database, endpoint: str, protocol: str, *, max_attempts: int = 1, worker: bool = True,
            grpc_port: int | None = None, provider: type[AliyunProvider] = AliyunProvider) -> Any:  # fmt: skip
    aliyun = aliyun_config(endpoint, protocol)
    config = Config(
        database_url=sidecar_url(database), hook_secrets=parse_secrets(HOOK_SECRET), provider="aliyun", aliyun=aliyun,
        worker=WorkerConfig(enabled=worker, max_attempts=max_attempts, backoff_seconds=0.0, sweep_seconds=0.2),
        grpc=GrpcConfig(port=grpc_port, auth_token=GRPC_TOKEN),
    )  # fmt: skip
    return run_app(create_app(config, provider(aliyun)))


def message_row(database: Database, phone: str) -> dict[str, Any]:
    row: dict[str, Any] = database.one(
        "select jsonb_build_object('id', id, 'status', status, 'code', code, 'last_error', last_error)"
        " from sms.outbox where phone = %s order by created_at desc limit 1", [phone],
    )  # fmt: skip
    return row


def deliveries(database: Database, message_id: str) -> list[tuple[str, str | None]]:
    return [(code, message) for code, message in database.execute(
        "select provider_code, provider_message from sms.deliveries where message_id = %s order by id", [message_id],
    )]  # fmt: skip


def sidecar_logs(caplog: Any) -> str:
    """The `sidecar` records as the JSON lines production writes, tracebacks included."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(r) for r in caplog.records if r.name.split(".")[0] == "sidecar")


def assert_clean(text: str, phone: str, code: str, where: str) -> None:
    for secret in (phone, phone[2:], code, *REQUEST_TEXT):
        assert secret not in text, f"{where} carries {secret!r}: {text[:600]}"


def assert_names(message: str | None, kind: str, endpoint: str, where: str, prefix: str = "") -> None:
    # host[:port], the kind, at most a library constant (an OpenSSL reason): nothing else.
    kinds = "|".join(re.escape(k) for k in kind.split(" | "))  # "a | b": either kind is right
    pattern = rf"{re.escape(prefix + endpoint)}: (?:{kinds})( \([A-Z0-9_]+\))?"
    assert message is not None and re.fullmatch(pattern, message), f"{where}: {message!r}"


@dataclass
class Failed:
    phone: str
    code: str
    row: dict[str, Any]
    deliveries: list[tuple[str, str | None]]
    status: dict[str, Any]
    logs: str
    metrics: str


def request_and_fail(api: PostgREST, database: Database, caplog: Any, endpoint: str, protocol: str,
                     max_attempts: int = 1, provider: type[AliyunProvider] = AliyunProvider) -> Failed:  # fmt: skip
    """A user asks for a code; the sidecar fails to deliver it for good; everything it left is collected."""
    phone, caller = fresh_phone(), user()
    response = api.rpc("request_phone_code", {"phone": phone}, caller)
    assert response.status == 200, response.body
    request_id = response.body["request_id"]
    code = database.one("select code from sms.outbox where code_id = %s", [request_id])  # before any worker runs
    assert code
    with caplog.at_level(logging.DEBUG, logger="sidecar"), sidecar(database, endpoint, protocol,
                                                                    max_attempts=max_attempts,
                                                                    provider=provider) as url:  # fmt: skip
        wait_until(lambda: message_row(database, phone)["status"] == "failed", 30, "the message to fail for good")
        metrics = httpx.get(url + "/metrics", timeout=5).text
    status = api.rpc("phone_code_status", {"request_id": request_id}, caller)
    assert status.status == 200, status.body
    row = message_row(database, phone)
    return Failed(phone, code, row, deliveries(database, row["id"]), status.body, sidecar_logs(caplog), metrics)


# --- the worker: codes requested through public.request_phone_code ----------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_unreachable_aliyun_leaves_only_the_kind_of_error_and_the_host(
    api: PostgREST, database: Database, caplog: Any, case: Case
) -> None:
    with case.endpoint() as (endpoint, protocol):
        failed = request_and_fail(api, database, caplog, endpoint, protocol)

    for where, text in (("the outbox row", json.dumps(failed.row, ensure_ascii=False)),
                        ("the ledger", json.dumps(failed.deliveries, ensure_ascii=False)),
                        ("phone_code_status", json.dumps(failed.status, ensure_ascii=False)),
                        ("the logs", failed.logs), ("the metrics", failed.metrics)):  # fmt: skip
        assert_clean(text, failed.phone, failed.code, where)
    assert [code for code, _ in failed.deliveries] == [case.provider_code]
    (provider_message,) = [message for _, message in failed.deliveries]
    assert failed.status["status"] == "failed"
    for where, message in (("outbox.last_error", failed.row["last_error"]),
                           ("deliveries.provider_message", provider_message),
                           ("phone_code_status", failed.status["error"])):  # fmt: skip
        assert_names(message, case.kind, endpoint, where)
    assert any(kind in failed.logs for kind in case.kind.split(" | "))


def test_a_failed_reconcile_leaves_only_the_kind_of_error_and_the_host(
    api: PostgREST, database: Database, caplog: Any
) -> None:
    """First attempt: reset mid-answer (ambiguous). Second: QuerySendDetails, by phone number, is refused."""

    def reset_then_refuse(conn: socket.socket, server: RawServer) -> None:
        server.stop_listening()
        reset_mid_answer(conn, server)

    with raw_server(reset_then_refuse) as server:
        failed = request_and_fail(api, database, caplog, server.endpoint, "http", max_attempts=2)
    for text in (json.dumps([failed.row, failed.deliveries, failed.status], ensure_ascii=False), failed.logs):
        assert_clean(text, failed.phone, failed.code, "the reconcile's traces")
    assert server.connections == 1
    assert [code for code, _ in failed.deliveries] == ["NoResponse", "ReconcileFailed"]
    assert_names(
        failed.deliveries[0][1],
        "connection reset | connection closed before the answer",
        server.endpoint,
        "the ambiguous attempt",
    )
    for where, message in (("deliveries.provider_message", failed.deliveries[1][1]),
                           ("outbox.last_error", failed.row["last_error"]),
                           ("phone_code_status", failed.status["error"])):  # fmt: skip
        assert_names(message, "connection refused", server.endpoint, where, prefix="QuerySendDetails: ")


class LeakyProvider(AliyunProvider):
    """A provider bug: an error whose text quotes the request escapes send(), and the worker logs it."""

    async def send(self, sms: Sms, timeout: float) -> SendResult:
        query = f"PhoneNumbers={sms.phone[2:]}&TemplateParam=%7B%22code%22%3A%22{sms.code}%22%7D"
        raise ConnectionRefusedError(f"Cannot connect to host {self.config.endpoint}/?{query}")


def test_an_error_escaping_the_provider_is_logged_by_its_class_only(
    api: PostgREST, database: Database, caplog: Any
) -> None:
    with closed_port() as (endpoint, protocol):
        failed = request_and_fail(api, database, caplog, endpoint, protocol, provider=LeakyProvider)
    for where, text in (("the ledger", json.dumps(failed.deliveries)), ("phone_code_status", json.dumps(failed.status)),
                        ("the logs", failed.logs)):  # fmt: skip
        assert_clean(text, failed.phone, failed.code, where)
    assert failed.deliveries == [("WorkerError", "connection refused")]
    raised = [json.loads(line) for line in failed.logs.splitlines() if '"delivery raised"' in line]
    assert len(raised) == 1 and raised[0]["error"] == "ConnectionRefusedError" and "exception" not in raised[0]


def test_a_code_that_failed_for_good_is_erased_everywhere(api: PostgREST, database: Database, caplog: Any) -> None:
    """README: the plain code in the outbox is erased once the message is delivered or given up."""
    with closed_port() as (endpoint, protocol):
        failed = request_and_fail(api, database, caplog, endpoint, protocol)
    assert failed.row["status"] == "failed"
    assert failed.row["code"] is None
    kept = database.one(
        "select count(*) from sms.outbox as o left join sms.deliveries as d on d.message_id = o.id"
        " where o.id = %s and (o.code is not null or strpos(coalesce(o.last_error, ''), %s) > 0"
        " or strpos(coalesce(d.provider_message, ''), %s) > 0)", [failed.row["id"], failed.code, failed.code],
    )  # fmt: skip
    assert kept == 0


# --- Aliyun's own refusals: kept, without request echo, capped ---------------------------------------------


def test_aliyun_messages_are_kept_but_never_echo_the_request(
    api: PostgREST, database: Database, fake: FakeAliyun, caplog: Any
) -> None:
    # The gateway's SignatureDoesNotMatch goes on with the string it signed: our request, query included.
    stated = "Specified signature is not matched with our calculation."
    echo = (f" server string to sign is:POST&%2F&OutId%3D1%26PhoneNumbers%3D13800000000%26TemplateParam%3D"
            f"%257B%2522code%2522%253A%2522{'1' * 6}%2522%257D")  # fmt: skip
    fake.fail_next(GatewayError(400, "SignatureDoesNotMatch", stated + echo))
    failed = request_and_fail(api, database, caplog, fake.endpoint, "http")
    assert failed.deliveries == [("SignatureDoesNotMatch", stated)]
    assert failed.status["error"] == stated
    assert "string to sign" not in failed.logs and "13800000000" not in failed.logs


def test_aliyun_messages_are_capped(api: PostgREST, database: Database, fake: FakeAliyun, caplog: Any) -> None:
    fake.fail_next(BusinessError("isv.SMS_TEMPLATE_ILLEGAL", "模板不合法 " * 100))
    failed = request_and_fail(api, database, caplog, fake.endpoint, "http")
    ((code, message),) = failed.deliveries
    assert code == "isv.SMS_TEMPLATE_ILLEGAL"
    assert message is not None and message.startswith("模板不合法 模板不合法") and len(message) <= 200
    assert failed.status["error"] == message


def test_an_error_page_is_not_quoted(api: PostgREST, database: Database, fake: FakeAliyun, caplog: Any) -> None:
    fake.fail_next(NonJsonError(body="<html><body>proxy error for /?PhoneNumbers=13800000000</body></html>"))
    failed = request_and_fail(api, database, caplog, fake.endpoint, "http")
    assert failed.deliveries == [("BadGateway", f"{fake.endpoint}: answer is not JSON")]
    assert "<html" not in failed.logs + json.dumps(failed.status)


# --- the hook and the gRPC API ------------------------------------------------------------------------------


def test_the_hook_leaves_only_the_kind_of_error_and_the_host(database: Database, caplog: Any) -> None:
    phone, otp = fresh_phone(), "918273"
    with closed_port() as (endpoint, protocol), caplog.at_level(logging.DEBUG, logger="sidecar"):
        with sidecar(database, endpoint, protocol, worker=False) as url:
            caller = GoTrueHookCaller(url + "/hooks/send-sms", HOOK_SECRET, version=(2, 196, 0))
            result = caller.call(otp_login((2, 196, 0), phone=phone, otp=otp))
    assert result.outcome == (503, result.message)
    row = message_row(database, phone)
    assert [code for code, _ in deliveries(database, row["id"])] == ["ConnectFailed", "ConnectFailed"]  # retried once
    for where, message in [("outbox.last_error", row["last_error"])] + [
        ("deliveries.provider_message", message) for _, message in deliveries(database, row["id"])
    ]:
        assert_names(message, "connection refused", endpoint, where)
    logs = sidecar_logs(caplog)
    assert "connection refused" in logs
    for where, text in (("the hook's answer", result.message or ""), ("the logs", logs)):
        assert_clean(text, phone, otp, where)


@pytest.fixture
def grpc_role(database: Database) -> Iterator[None]:
    """The login running gRPC gets sms_grpc (docs/grpc-migration.md), where the migrations define that role."""
    granted = database.one("select count(*) from pg_roles where rolname = 'sms_grpc'"
                           " and not pg_has_role('sms_sidecar', 'sms_grpc', 'member')")  # fmt: skip
    if granted:
        database.execute("grant sms_grpc to sms_sidecar")
    yield
    if granted:
        database.execute("revoke sms_grpc from sms_sidecar")


@pytest.mark.usefixtures("grpc_role")
def test_the_grpc_answer_leaves_only_the_kind_of_error_and_the_host(database: Database, caplog: Any) -> None:
    phone, grpc_port = fresh_phone(), free_port()
    with tls_to_plain_text() as (endpoint, protocol), caplog.at_level(logging.DEBUG, logger="sidecar"):
        # The gRPC server without a worker, so the code can be read before anything sends it.
        with sidecar(database, endpoint, protocol, worker=False, grpc_port=grpc_port), \
                grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel, ThreadPoolExecutor(1) as pool:  # fmt: skip
            stub = pb_grpc.PhoneNumberServiceStub(channel)
            call = pool.submit(stub.SendSMS, pb.SendSMSRequest(phone_number=phone),
                               metadata=(("authorization", f"Bearer {GRPC_TOKEN}"),), timeout=12)  # fmt: skip
            wait_until(lambda: database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 1, 5,
                       "the code to be issued")  # fmt: skip
            code = database.one("select code from sms.outbox where phone = %s", [phone])
            assert code
            with sidecar(database, endpoint, protocol):  # now a worker delivers it, and fails
                error = call.exception(timeout=15)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    details = error.details() or ""
    assert re.fullmatch(rf"the SMS was not sent \(ConnectFailed\): {re.escape(endpoint)}: TLS handshake failed"
                        r"( \([A-Z0-9_]+\))?", details), details  # fmt: skip
    logs = sidecar_logs(caplog)
    for where, text in (("the gRPC answer", details), ("the logs", logs)):
        assert_clean(text, phone, code, where)
