"""Configuration from the environment: every problem is one line naming the variable, never a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import (
    DEFAULT_ENDPOINT,
    Config,
    ConfigError,
    GrpcConfig,
    check_database_url,
    is_placeholder,
    mask_password,
)
from sidecar.logs import mask_phone
from tests.support.gotrue import generate_secret

SECRET = generate_secret()
ALIYUN = {
    "DATABASE_URL": "postgresql://sms_sidecar@db/postgres",
    "SEND_SMS_HOOK_SECRETS": SECRET,
    "ALIYUN_ACCESS_KEY_ID": "LTAI5tExample",
    "ALIYUN_ACCESS_KEY_SECRET": "very-secret-value",
    "ALIYUN_SMS_SIGN_NAME": "阿里云短信测试",
    "ALIYUN_SMS_TEMPLATE_CODE": "SMS_154950909",
}


def test_a_complete_aliyun_configuration() -> None:
    config = Config.from_env(ALIYUN)
    assert config.provider == "aliyun" and config.aliyun is not None
    assert (config.aliyun.endpoint, config.aliyun.protocol, config.aliyun.template_param) == (
        DEFAULT_ENDPOINT, "https", "code",
    )  # fmt: skip
    assert len(config.hook_secrets) == 1 and (config.host, config.port) == ("127.0.0.1", 8090)
    assert "very-secret-value" not in repr(config) and "very-secret-value" not in repr(config.aliyun)


def test_the_deno_functions_single_secret_name_is_accepted() -> None:
    env = {k: v for k, v in ALIYUN.items() if k != "SEND_SMS_HOOK_SECRETS"} | {"SEND_SMS_HOOK_SECRET": SECRET}
    assert len(Config.from_env(env).hook_secrets) == 1


def test_several_secrets_for_rotation() -> None:
    env = ALIYUN | {"SEND_SMS_HOOK_SECRETS": f"{SECRET}|{generate_secret()}"}
    assert len(Config.from_env(env).hook_secrets) == 2


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:9100", ("127.0.0.1:9100", "http")),
        ("https://dysmsapi.ap-southeast-1.aliyuncs.com", ("dysmsapi.ap-southeast-1.aliyuncs.com", "https")),
        ("dysmsapi.aliyuncs.com", ("dysmsapi.aliyuncs.com", "https")),
    ],
)
def test_endpoint_forms(endpoint: str, expected: tuple[str, str]) -> None:
    aliyun = Config.from_env(ALIYUN | {"ALIYUN_SMS_ENDPOINT": endpoint}).aliyun
    assert aliyun is not None and (aliyun.endpoint, aliyun.protocol) == expected


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"ALIYUN_ACCESS_KEY_ID": ""}, "ALIYUN_ACCESS_KEY_ID"),
        ({"ALIYUN_ACCESS_KEY_SECRET": ""}, "ALIYUN_ACCESS_KEY_SECRET"),
        ({"ALIYUN_SMS_SIGN_NAME": ""}, "ALIYUN_SMS_SIGN_NAME"),
        ({"ALIYUN_SMS_TEMPLATE_CODE": "SMS 1"}, "ALIYUN_SMS_TEMPLATE_CODE"),
        ({"ALIYUN_SMS_TEMPLATE_PARAM": "1code"}, "ALIYUN_SMS_TEMPLATE_PARAM"),
        ({"ALIYUN_SMS_INTL_SIGN_NAME": "Intl"}, "ALIYUN_SMS_INTL_TEMPLATE_CODE"),
        ({"ALIYUN_SMS_ENDPOINT": "ftp://example.com"}, "ALIYUN_SMS_ENDPOINT"),
        ({"ALIYUN_SMS_ENDPOINT": "http://host:99999"}, "ALIYUN_SMS_ENDPOINT"),
        ({"SMS_PROVIDER": "twilio"}, "SMS_PROVIDER"),
        ({"PORT": "eighty"}, "PORT"),
        ({"SEND_SMS_HOOK_SECRETS": "whsec_abc"}, "SEND_SMS_HOOK_SECRETS"),
        ({"SEND_SMS_HOOK_SECRETS": SECRET[:-4] + "!!!!"}, "SEND_SMS_HOOK_SECRETS"),
        ({"ALIYUN_SMS_REPORT_TOKEN": "short"}, "ALIYUN_SMS_REPORT_TOKEN"),
        ({"ALIYUN_SMS_REPORT_TOKEN": "has/a/slash/in/it/0123"}, "ALIYUN_SMS_REPORT_TOKEN"),
        ({"ALIYUN_SMS_REPORT_TOKEN": "REPLACE_WITH_OUTPUT_OF_openssl"}, "ALIYUN_SMS_REPORT_TOKEN"),
        ({"SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS": "30"}, "SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS"),
        ({"SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS": "soon"}, "SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS"),
        ({"SMS_WORKER_RECEIPT_POLL_QPS": "1000"}, "SMS_WORKER_RECEIPT_POLL_QPS"),
    ],
)
def test_problems_name_the_variable(change: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env(ALIYUN | change)
    message = str(caught.value)
    assert message.startswith(named) or f" {named} " in f" {message} "
    assert "very-secret-value" not in message and SECRET not in message and "\n" not in message


def test_delivery_receipts_are_off_unless_configured() -> None:
    config = Config.from_env(ALIYUN)
    assert (config.report_token, config.worker.receipt_poll_after_seconds, config.receipts) == (None, 0, False)
    token = "0123456789abcdef-_ABCDEF"
    pushed = Config.from_env(ALIYUN | {"ALIYUN_SMS_REPORT_TOKEN": token})
    assert pushed.report_token == token and pushed.receipts and token not in repr(pushed)
    polled = Config.from_env(ALIYUN | {"SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS": "300",
                                       "SMS_WORKER_RECEIPT_POLL_QPS": "2.5"})  # fmt: skip
    assert (polled.worker.receipt_poll_after_seconds, polled.worker.receipt_poll_qps, polled.receipts) == (
        300, 2.5, True)  # fmt: skip


def test_console_provider_needs_no_aliyun_settings() -> None:
    config = Config.from_env({"DATABASE_URL": "postgresql:///x", "SMS_PROVIDER": "console"})
    assert config.provider == "console" and config.aliyun is None and config.hook_secrets == ()


def test_serve_fails_fast_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIYUN_", "SEND_SMS", "SMS_"))}
    env.update(DATABASE_URL="postgresql:///x", SMS_PROVIDER="aliyun")
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve"], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("sms-sidecar: ALIYUN_ACCESS_KEY_ID is not set")


GRPC_TOKEN = "grpc-config-token-8d2f6a1c"


def pem_files(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "server.crt", directory / "server.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIEfake\n-----END PRIVATE KEY-----\n")
    return cert, key


def test_grpc_is_off_without_a_port() -> None:
    config = Config.from_env(ALIYUN)
    assert config.grpc == GrpcConfig() and config.grpc.port is None


def test_a_complete_grpc_configuration(tmp_path: Path) -> None:
    cert, key = pem_files(tmp_path)
    env = {"GRPC_PORT": "50511", "GRPC_AUTH_TOKEN": GRPC_TOKEN, "GRPC_TLS_CERT_FILE": str(cert),
           "GRPC_TLS_KEY_FILE": str(key)}  # fmt: skip
    config = Config.from_env(ALIYUN | env)
    assert config.grpc == GrpcConfig(port=50511, auth_token=GRPC_TOKEN, allow_unauthenticated=False,
                                     tls_cert_file=str(cert), tls_key_file=str(key))  # fmt: skip
    assert GRPC_TOKEN not in repr(config.grpc) and GRPC_TOKEN not in repr(config)


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_grpc_without_a_token_only_when_allowed(value: str) -> None:
    grpc = Config.from_env(ALIYUN | {"GRPC_PORT": "50511", "GRPC_ALLOW_UNAUTHENTICATED": value}).grpc
    assert (grpc.port, grpc.auth_token, grpc.allow_unauthenticated) == (50511, None, True)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"GRPC_PORT": "grpc"}, "GRPC_PORT"),
        ({"GRPC_PORT": "65536"}, "GRPC_PORT"),
        ({"GRPC_PORT": "50511", "GRPC_AUTH_TOKEN": ""}, "GRPC_AUTH_TOKEN"),
        ({"GRPC_PORT": "50511", "GRPC_AUTH_TOKEN": "", "GRPC_ALLOW_UNAUTHENTICATED": "false"}, "GRPC_AUTH_TOKEN"),
        ({"GRPC_AUTH_TOKEN": "too-short"}, "GRPC_AUTH_TOKEN"),
        ({"GRPC_AUTH_TOKEN": "a token with spaces in it"}, "GRPC_AUTH_TOKEN"),
        ({"GRPC_AUTH_TOKEN": "令牌令牌令牌令牌令牌令牌令牌令牌"}, "GRPC_AUTH_TOKEN"),
        ({"GRPC_ALLOW_UNAUTHENTICATED": "yes"}, "GRPC_ALLOW_UNAUTHENTICATED"),
        ({"GRPC_TLS_CERT_FILE": "{dir}/server.crt"}, "GRPC_TLS_KEY_FILE"),
        ({"GRPC_TLS_KEY_FILE": "{dir}/server.key"}, "GRPC_TLS_CERT_FILE"),
        ({"GRPC_TLS_CERT_FILE": "{dir}/missing.crt", "GRPC_TLS_KEY_FILE": "{dir}/server.key"}, "GRPC_TLS_CERT_FILE"),
        ({"GRPC_TLS_CERT_FILE": "{dir}/server.crt", "GRPC_TLS_KEY_FILE": "{dir}"}, "GRPC_TLS_KEY_FILE"),
        ({"GRPC_TLS_CERT_FILE": "{dir}/server.key", "GRPC_TLS_KEY_FILE": "{dir}/server.key"}, "GRPC_TLS_CERT_FILE"),
        ({"GRPC_TLS_CERT_FILE": "{dir}/server.crt", "GRPC_TLS_KEY_FILE": "{dir}/server.crt"}, "GRPC_TLS_KEY_FILE"),
    ],
    ids=["port-word", "port-range", "no-token", "not-allowed", "token-short", "token-spaces", "token-non-ascii",
         "allow-word", "cert-alone", "key-alone", "cert-missing", "key-directory", "cert-not-pem-cert",
         "key-not-pem-key"],
)  # fmt: skip
def test_grpc_problems_name_the_variable(change: dict[str, str], named: str, tmp_path: Path) -> None:
    pem_files(tmp_path)
    env = ALIYUN | {"GRPC_AUTH_TOKEN": GRPC_TOKEN} | {k: v.replace("{dir}", str(tmp_path)) for k, v in change.items()}
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    message = str(caught.value)
    assert message.startswith(named), message
    assert GRPC_TOKEN not in message and "\n" not in message
    if "GRPC_AUTH_TOKEN" in change and change["GRPC_AUTH_TOKEN"]:
        assert change["GRPC_AUTH_TOKEN"] not in message


@pytest.mark.parametrize("command", ["grpc", "serve"])
def test_grpc_without_a_token_fails_fast_with_one_line(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIYUN_", "SEND_SMS", "SMS_", "GRPC_"))}
    env.update(DATABASE_URL="postgresql:///x", SMS_PROVIDER="console", GRPC_PORT="50511")
    result = subprocess.run([sys.executable, "-m", "sidecar", command], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("sms-sidecar: GRPC_AUTH_TOKEN is not set"), line


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("8613012341234", "+86*******1234"),
        ("12025550123", "+1******0123"),
        ("85291234567", "+852****4567"),
        ("447911123456", "+44******3456"),
        ("", ""),
        ("123", "***"),
    ],
)
def test_phone_masking_keeps_country_code_and_last_four(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql//sms:hunter2@127.0.0.1/postgres", "postgresql//sms:***@127.0.0.1/postgres"),
        ("postgres://u:p@ss:w@rd@h/db", "postgres://u:***@h/db"),  # '@' in the password
        ("postgresql//u:p/w@h/db", "postgresql//u:***@h/db"),
        ("sms:hunter2@host", "sms:***@host"),
        ("host=h password=secret user=x", "host=h password=*** user=x"),
        ("host=h password='a b' user=x", "host=h password=*** user=x"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_mask_password_hides_the_password_even_in_malformed_urls(url: str, masked: str) -> None:
    assert mask_password(url) == masked


def test_a_database_url_libpq_cannot_parse_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError, match=r"DATABASE_URL is not a PostgreSQL URL \(postgresql//u:\*\*\*@h/db\)"):
        check_database_url("postgresql//u:hunter2@h/db")
    check_database_url("postgresql://u:hunter2@h/db")


ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def test_the_env_example_database_password_placeholder_is_refused() -> None:
    # As shipped, .env.example's SMS_SIDECAR_DB_PASSWORD lands in the sidecar's DATABASE_URL unchanged.
    (placeholder,) = [
        line.partition("=")[2]
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line.startswith("SMS_SIDECAR_DB_PASSWORD=")
    ]
    assert is_placeholder(placeholder)
    url = f"postgresql://sms_sidecar:{placeholder}@db:5432/postgres"
    refused = r"^DATABASE_URL: the password is still the REPLACE_WITH_\.\.\. placeholder"
    with pytest.raises(ConfigError, match=refused) as info:
        Config.from_env({**ALIYUN, "DATABASE_URL": url})
    assert placeholder not in str(info.value)
    with pytest.raises(ConfigError, match="placeholder"):
        check_database_url(f"host=db user=sms_sidecar password={placeholder}")
    # A real password (openssl rand -hex 24) passes, and so does no password at all.
    check_database_url("postgresql://sms_sidecar:3f9a0c1b2d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f506@db:5432/postgres")
    check_database_url("postgresql://sms_sidecar@db/postgres")


def test_migrate_refuses_the_placeholder_before_touching_the_database() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SMS_SIDECAR_DB_PASSWORD",)}
    env.update(DATABASE_URL="postgresql://postgres:pw@127.0.0.1:1/postgres",
               SMS_SIDECAR_DB_PASSWORD="REPLACE_WITH_OUTPUT_OF_openssl_rand_hex_24")  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "sidecar", "migrate"], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "sms-sidecar: SMS_SIDECAR_DB_PASSWORD is still the REPLACE_WITH_... placeholder from .env.example; "
        "set a real password in .env (e.g. openssl rand -hex 24)"
    ]
