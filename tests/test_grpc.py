"""The phone-number gRPC service (`sms-sidecar grpc`) as a client of the Go original sees it.

A real gRPC client built from the checked-in stubs calls real sidecar processes, which issue and check
codes in the real database and deliver them through the fake Aliyun. Codes are read from what the
fake received, as a person reads them from the phone.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from sidecar.grpc_api import phonenumberservice_pb2 as pb, phonenumberservice_pb2_grpc as pb_grpc
from tests.support.aliyun import SIGN, TEMPLATE, aliyun_env
from tests.support.builders import fresh_phone
from tests.support.database import Database, drain_queue
from tests.support.fake_aliyun import BusinessError, FakeAliyun
from tests.support.servers import SidecarProcess, free_port, port_open, sidecar_url

pytestmark = pytest.mark.usefixtures("isolated")

TOKEN = "grpc-test-token-5f1c0e9a7b3d"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICE = "phonenumberservice.PhoneNumberService"
PROTO = Path(__file__).resolve().parents[1] / "sidecar" / "grpc_api" / "phonenumberservice.proto"


def sidecar_env(database: Database, fake: FakeAliyun, **env: str) -> dict[str, str]:
    return {
        "DATABASE_URL": sidecar_url(database),
        "SMS_PROVIDER": "aliyun",
        **aliyun_env(fake),
        "SMS_WORKER_SWEEP_SECONDS": "0.2",
        "SMS_WORKER_BACKOFF_SECONDS": "0",
        "SMS_WORKER_MAX_ATTEMPTS": "50",  # a provider outage keeps the message queued, not failed
        "GRPC_AUTH_TOKEN": TOKEN,
        **env,
    }


def grpc_process(database: Database, fake: FakeAliyun, *, ready: Any = None, **env: str) -> SidecarProcess:
    """`sms-sidecar grpc --port P` against the test database and the fake Aliyun."""
    return SidecarProcess(sidecar_env(database, fake, **env), args=("grpc", "--port", "{port}"), ready=ready or serving)


def health_status(target: str, credentials: Any = None, **options: Any) -> Any:
    channel_options = list(options.items())
    with (
        grpc.secure_channel(target, credentials, options=channel_options)
        if credentials is not None
        else grpc.insecure_channel(target)
    ) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)


def serving(sidecar: SidecarProcess) -> bool:
    try:
        return bool(health_status(f"127.0.0.1:{sidecar.port}").status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


@pytest.fixture(scope="module", autouse=True)
def grpc_role(database: Database) -> Iterator[None]:
    """What docs/grpc-migration.md tells the operator: the login that runs gRPC gets sms_grpc."""
    database.execute("grant sms_grpc to sms_sidecar")
    yield
    database.execute("revoke sms_grpc from sms_sidecar")


@pytest.fixture(scope="module")
def server(database: Database, fake: FakeAliyun) -> Iterator[SidecarProcess]:
    drain_queue(database)  # leftovers of other modules must not reach this fake
    with grpc_process(database, fake) as sidecar:
        yield sidecar


@pytest.fixture(scope="module")
def stub(server: SidecarProcess) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.PhoneNumberServiceStub(channel)


def sent_to(fake: FakeAliyun, phone: str) -> list[Any]:
    return [s for s in fake.sends if "86" + s.phone_numbers == phone]


def code_for(fake: FakeAliyun, phone: str) -> str:
    """The code of the last SMS the fake Aliyun took for this number (E.164 digits)."""
    sends = sent_to(fake, phone)
    assert sends, f"nothing was sent to {phone}"
    code: str = sends[-1].template_param["code"]
    return code


def another_code(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def refused(call: Any, *args: Any, **kwargs: Any) -> Any:
    """The grpc.RpcError (also a grpc.Call: code, details, trailing metadata) the call raised."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def send(stub: Any, phone: str, signature: str = "", template_code: str = "", **kwargs: Any) -> Any:
    request = pb.SendSMSRequest(phone_number=phone, signature=signature, template_code=template_code)
    return stub.SendSMS(request, metadata=AUTH, timeout=kwargs.pop("timeout", 10), **kwargs)


def valid(stub: Any, phone: str, code: str, **kwargs: Any) -> bool:
    response = stub.Valid(pb.ValidRequest(phone_number=phone, code=code), metadata=AUTH, timeout=10, **kwargs)
    return bool(response.valid)


def outbox_count(database: Database, phone: str) -> int:
    return int(database.one("select count(*) from sms.outbox where phone = %s", [phone]))


# --------------------------------------------------------------------------------------------
# The stubs
# --------------------------------------------------------------------------------------------


def test_the_checked_in_stubs_are_generated_from_the_proto(tmp_path: Path) -> None:
    from grpc_tools import protoc

    descriptor_set = tmp_path / "set.pb"
    args = ["protoc", f"--proto_path={PROTO.parent}", f"--descriptor_set_out={descriptor_set}", PROTO.name]
    assert protoc.main(args) == 0
    (from_proto,) = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    for message in from_proto.message_type:  # protoc fills json_name in descriptor sets, not in the stubs
        for field in message.field:
            field.ClearField("json_name")
    checked_in = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(checked_in)
    assert checked_in == from_proto, "the stubs are stale: run scripts/gen_grpc.sh"
    # The service the Go clients call, exactly.
    (service,) = from_proto.service
    assert (from_proto.package, service.name) == ("phonenumberservice", "PhoneNumberService")
    methods = {m.name: (m.input_type, m.output_type) for m in service.method}
    assert methods == {
        "SendSMS": (".phonenumberservice.SendSMSRequest", ".phonenumberservice.Empty"),
        "Valid": (".phonenumberservice.ValidRequest", ".phonenumberservice.ValidResponse"),
    }
    # Imported as a package module: the generated top-level import was made relative.
    assert pb_grpc.phonenumberservice__pb2 is pb


# --------------------------------------------------------------------------------------------
# The original's flow
# --------------------------------------------------------------------------------------------


def test_the_originals_example_flow(stub: Any, fake: FakeAliyun, database: Database) -> None:
    phone = fresh_phone()
    national = phone[2:]  # how the Go service's clients name a mainland number
    assert send(stub, national) == pb.Empty()
    # SendSMS answered after Aliyun took the SMS, as the original did.
    (sms,) = sent_to(fake, phone)
    assert (sms.sign_name, sms.template_code) == (SIGN, TEMPLATE)
    code = sms.template_param["code"]
    assert len(code) == 6 and code.isdigit()
    assert valid(stub, national, code) is True
    assert valid(stub, national, code) is False, "a code is accepted once"
    assert database.one("select source from sms.outbox where phone = %s", [phone]) == "grpc"


def test_a_second_send_invalidates_the_first_code(stub: Any, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    send(stub, "+" + phone)
    first = code_for(fake, phone)
    send(stub, "+" + phone)
    second = code_for(fake, phone)
    assert len(sent_to(fake, phone)) == 2
    if first != second:  # one chance in a million that they are equal
        assert valid(stub, phone, first) is False
    assert valid(stub, phone, second) is True


def test_three_wrong_codes_invalidate_every_code(stub: Any, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    send(stub, phone)
    code = code_for(fake, phone)
    assert [valid(stub, phone, another_code(code)) for _ in range(3)] == [False, False, False]
    assert valid(stub, phone, code) is False


def test_concurrent_checks_of_the_right_code_accept_exactly_one(stub: Any, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    send(stub, phone)
    code = code_for(fake, phone)
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda _: valid(stub, phone, code), range(20)))
    assert results.count(True) == 1, results


def test_test_numbers_are_answered_without_texting(stub: Any, fake: FakeAliyun, settings: Any) -> None:
    phone = fresh_phone()
    settings(test_codes={phone: "246810"})
    assert send(stub, phone) == pb.Empty()
    assert sent_to(fake, phone) == []
    assert valid(stub, phone, "246810") is True


# --------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-token-of-some-length"),),
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", f"Bearer {TOKEN[:-1]}"),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("x-api-key", TOKEN),),
    ],
    ids=["none", "wrong", "not-bearer", "prefix", "longer", "other-header"],
)
def test_calls_without_the_token_are_unauthenticated(
    stub: Any, fake: FakeAliyun, database: Database, metadata: Any
) -> None:
    phone = fresh_phone()
    error = refused(stub.SendSMS, pb.SendSMSRequest(phone_number=phone), metadata=metadata, timeout=5)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = refused(stub.Valid, pb.ValidRequest(phone_number=phone, code="123456"), metadata=metadata, timeout=5)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert outbox_count(database, phone) == 0 and sent_to(fake, phone) == []


def test_the_bearer_scheme_is_case_insensitive(stub: Any, fake: FakeAliyun) -> None:
    phone = fresh_phone()
    request = pb.SendSMSRequest(phone_number=phone)
    stub.SendSMS(request, metadata=(("authorization", f"bearer {TOKEN}"),), timeout=10)
    assert len(sent_to(fake, phone)) == 1


# --------------------------------------------------------------------------------------------
# SendSMS status codes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phone", "signature", "template_code", "says"),
    [
        ("", "", "", "phone_number"),
        ("   ", "", "", "phone_number"),
        ("12345", "", "", "invalid_phone"),
        ("+8612345678901", "", "", "invalid_phone"),
        ("+12025550123", "", "", "phone_not_allowed"),
        (None, SIGN, "", "go together"),
        (None, "", TEMPLATE, "go together"),
        (None, "未登记签名", "SMS_999999", "template_not_allowed"),
        (None, SIGN, "SMS_999999", "template_not_allowed"),
    ],
    ids=["empty", "blank", "short", "not-mobile", "country", "sign-only", "template-only", "unknown-pair",
         "default-sign-other-template"],
)  # fmt: skip
def test_bad_requests_are_invalid_argument(
    stub: Any, fake: FakeAliyun, database: Database, phone: str | None, signature: str, template_code: str, says: str
) -> None:
    number = phone if phone is not None else fresh_phone()
    error = refused(send, stub, number, signature, template_code)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details()
    assert fake.sends == []
    if phone is None:
        assert outbox_count(database, number) == 0


def test_a_pair_registered_in_sms_templates_is_sent_with(stub: Any, fake: FakeAliyun, database: Database) -> None:
    database.execute(
        "insert into sms.templates (purpose, sign_name, template_code) values ('grpc-login', '登录签名', 'SMS_777001')"
    )
    try:
        phone = fresh_phone()
        assert send(stub, phone, "登录签名", "SMS_777001") == pb.Empty()
        (sms,) = sent_to(fake, phone)
        assert (sms.sign_name, sms.template_code) == ("登录签名", "SMS_777001")
        assert valid(stub, phone, sms.template_param["code"]) is True
    finally:
        database.execute("delete from sms.templates where purpose = 'grpc-login'")


def test_the_configured_default_pair_means_the_defaults(stub: Any, fake: FakeAliyun, database: Database) -> None:
    assert database.one("select count(*) from sms.templates where sign_name = %s", [SIGN]) == 0
    phone = fresh_phone()
    assert send(stub, phone, SIGN, TEMPLATE) == pb.Empty()
    (sms,) = sent_to(fake, phone)
    assert (sms.sign_name, sms.template_code) == (SIGN, TEMPLATE)


def test_the_rate_limit_is_resource_exhausted_with_retry_after(
    stub: Any, fake: FakeAliyun, database: Database, settings: Any
) -> None:
    settings(resend_cooldown_seconds=60)
    phone = fresh_phone()
    send(stub, phone)
    error = refused(send, stub, phone)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(error.trailing_metadata() or ())
    wait = int(trailing["retry-after"])
    assert 50 <= wait <= 60
    assert f"retry after {wait} s" in error.details()
    assert len(sent_to(fake, phone)) == 1 and outbox_count(database, phone) == 1


@pytest.mark.parametrize(
    ("provider_code", "status"),
    [
        ("isv.MOBILE_NUMBER_ILLEGAL", grpc.StatusCode.INVALID_ARGUMENT),  # the number: the caller's to fix
        ("isv.AMOUNT_NOT_ENOUGH", grpc.StatusCode.UNAVAILABLE),  # the account: the operator's to fix
    ],
)
def test_a_provider_refusal_is_mapped_by_its_code(
    stub: Any, fake: FakeAliyun, database: Database, provider_code: str, status: grpc.StatusCode
) -> None:
    phone = fresh_phone()
    fake.fail_phone(phone[2:], BusinessError(provider_code))
    error = refused(send, stub, phone)
    assert error.code() == status
    assert provider_code in error.details()
    assert database.one("select status from sms.outbox where phone = %s", [phone]) == "failed"


def test_a_provider_outage_is_unavailable_within_the_deadline(stub: Any, fake: FakeAliyun, database: Database) -> None:
    fake.set_default(BusinessError("isp.SYSTEM_ERROR"))
    phone = fresh_phone()
    started = time.monotonic()
    error = refused(send, stub, phone, timeout=1.5)
    assert time.monotonic() - started < 1.5
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "not confirmed yet" in error.details() and "isp.SYSTEM_ERROR" in error.details()
    # Still being retried, as the worker does for any code.
    assert database.one("select status from sms.outbox where phone = %s", [phone]) in ("queued", "sending")


# --------------------------------------------------------------------------------------------
# Valid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("phone", "code"), [("not-a-phone", "123456"), ("12345", "123456"), (None, ""),
                                             (None, "x" * 65)])  # fmt: skip
def test_malformed_checks_are_false_not_errors(stub: Any, phone: str | None, code: str) -> None:
    assert valid(stub, phone or fresh_phone(), code) is False


def test_a_number_without_a_code_is_false(stub: Any) -> None:
    assert valid(stub, fresh_phone(), "123456") is False


# --------------------------------------------------------------------------------------------
# Health and reflection: no token needed
# --------------------------------------------------------------------------------------------


def test_health_is_serving_without_a_token(server: SidecarProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        error = refused(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service(server: SidecarProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reflection_db = ProtoReflectionDescriptorDatabase(channel)
        services = set(reflection_db.get_services())
        assert {SERVICE, "grpc.health.v1.Health"} <= services
        described = DescriptorPool(reflection_db).FindServiceByName(SERVICE)
        assert {m.name for m in described.methods} == {"SendSMS", "Valid"}
        assert described.methods_by_name["Valid"].output_type.fields_by_name["valid"].number == 1


# --------------------------------------------------------------------------------------------
# Other processes: the database away, TLS, `serve` with GRPC_PORT, start-up errors
# --------------------------------------------------------------------------------------------


def test_an_unreachable_database_is_unavailable(database: Database, fake: FakeAliyun) -> None:
    nowhere = f"postgresql://sms_sidecar:x@127.0.0.1:{free_port()}/postgres?connect_timeout=1"
    with grpc_process(database, fake, ready=port_open, DATABASE_URL=nowhere) as sidecar:
        target = f"127.0.0.1:{sidecar.port}"
        assert health_status(target).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.PhoneNumberServiceStub(channel)
            started = time.monotonic()
            error = refused(send, stub, fresh_phone(), timeout=1.5)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            error = refused(stub.Valid, pb.ValidRequest(phone_number=fresh_phone(), code="123456"), metadata=AUTH,
                            timeout=1.5)  # fmt: skip
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert time.monotonic() - started < 3.0
    assert fake.sends == []


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "grpc.crt", directory / "grpc.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_tls_with_a_self_signed_certificate(database: Database, fake: FakeAliyun, tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
    sidecar = grpc_process(database, fake, ready=port_open, GRPC_TLS_CERT_FILE=str(cert_file),
                           GRPC_TLS_KEY_FILE=str(key_file))  # fmt: skip
    with sidecar:
        target = f"127.0.0.1:{sidecar.port}"
        deadline = time.monotonic() + 10
        while health_status(target, credentials).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "not serving over TLS"
            time.sleep(0.1)
        with grpc.secure_channel(target, credentials) as channel:
            stub = pb_grpc.PhoneNumberServiceStub(channel)
            phone = fresh_phone()
            send(stub, phone)
            assert valid(stub, phone, code_for(fake, phone)) is True
        with grpc.insecure_channel(target) as plaintext:  # the TLS port speaks nothing else
            error = refused(pb_grpc.PhoneNumberServiceStub(plaintext).Valid, pb.ValidRequest(), metadata=AUTH,
                            timeout=2)  # fmt: skip
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        # SIGTERM: in-flight calls finish, the worker stops, the process exits cleanly.
        assert sidecar.kill(signal.SIGTERM) == 0
        assert '"sidecar stopped"' in sidecar.output()
        assert code_for(fake, phone) not in sidecar.output(), "codes are never logged"
        assert phone not in sidecar.output() and phone[2:] not in sidecar.output(), "numbers are logged masked"


def test_serve_runs_the_grpc_api_beside_the_hook_when_grpc_port_is_set(database: Database, fake: FakeAliyun) -> None:
    grpc_port = free_port()
    env = sidecar_env(database, fake, GRPC_PORT=str(grpc_port), GRPC_ALLOW_UNAUTHENTICATED="true", GRPC_AUTH_TOKEN="")
    sidecar = SidecarProcess(env)  # `serve`
    with sidecar:  # ready: /readyz answered 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.PhoneNumberServiceStub(channel)
            phone = fresh_phone()
            stub.SendSMS(pb.SendSMSRequest(phone_number=phone), timeout=10)  # no token needed here
            response = stub.Valid(pb.ValidRequest(phone_number=phone, code=code_for(fake, phone)), timeout=10)
            assert response.valid is True
        sidecar.kill(signal.SIGTERM)
        assert "gRPC server stopped" in sidecar.output()


def test_a_grpc_port_in_use_fails_with_a_clear_error(database: Database, fake: FakeAliyun) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {**os.environ, **sidecar_env(database, fake), "HOST": "127.0.0.1", "GRPC_PORT": port}
        result = subprocess.run([sys.executable, "-m", "sidecar", "grpc"], env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    assert result.returncode != 0
    # gRPC's core logs its own line first; ours is the last.
    assert result.stderr.strip().splitlines()[-1] == (
        f"sms-sidecar grpc: cannot listen on 127.0.0.1:{env['GRPC_PORT']}: "
        "the port is in use or the address is not here"
    )


def test_without_grpcio_the_command_says_how_to_install_it() -> None:
    script = "import sys; sys.modules['grpc'] = None; from sidecar.cli import main; raise SystemExit(main(['grpc']))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "pip install 'supabase-aliyun-sms[grpc]'" in line


def test_the_base_install_never_imports_grpc() -> None:
    script = (
        "import sys\n"
        "from sidecar.cli import build_parser\n"
        "from sidecar.app import create_app\n"
        "from sidecar.config import Config\n"
        "create_app(Config.from_env({'DATABASE_URL': 'postgresql:///x', 'SMS_PROVIDER': 'console'}))\n"
        "build_parser().parse_args(['serve'])\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'google') or m.startswith('sidecar.grpc')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_without_the_grpc_role_the_login_cannot_issue_or_check_codes(
    database: Database, stub: Any, fake: FakeAliyun
) -> None:
    # Least privilege: a sidecar login that was not given sms_grpc holds no gRPC code function.
    database.execute("revoke sms_grpc from sms_sidecar")
    try:
        for call, request in (
            (stub.SendSMS, pb.SendSMSRequest(phone_number=fresh_phone())),
            (stub.Valid, pb.ValidRequest(phone_number=fresh_phone(), code="123456")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, metadata=AUTH, timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "sms_grpc" in (caught.value.details() or "")
        assert fake.sends == []
    finally:
        database.execute("grant sms_grpc to sms_sidecar")
