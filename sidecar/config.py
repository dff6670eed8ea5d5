"""Configuration from the environment, parsed once at start-up (interface §2).

Every problem becomes one `ConfigError` line naming the variable; values of secrets never appear
in messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from sidecar.errors import SidecarError
from sidecar.webhook import WebhookSecretError, parse_secrets

__all__ = ["AliyunConfig", "Config", "ConfigError", "GrpcConfig", "WorkerConfig"]

T = TypeVar("T", int, float)

DEFAULT_ENDPOINT = "dysmsapi.aliyuncs.com"
_TEMPLATE_CODE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_PLACEHOLDER = re.compile(r"REPLACE_WITH", re.IGNORECASE)  # .env.example: "replace every REPLACE_... value"
_GRPC_TOKEN = re.compile(r"^[\x21-\x7e]{16,512}$")  # visible ASCII: it travels in a metadata header
_REPORT_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # a URL path segment that needs no escaping


def mask_password(url: str) -> str:
    """The URL with anything that may be a password replaced by ``***``, even in a malformed URL."""
    url = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url, flags=re.I)
    head, at, tail = url.rpartition("@")  # a password may contain '@'; the host part cannot
    if not at:
        return url
    scheme = re.match(r"[a-z][a-z0-9+.-]*:?/+", head, re.I)  # "postgresql://", also "postgresql//"
    prefix = scheme.group(0) if scheme else ""
    user, colon, _ = head[len(prefix) :].partition(":")
    return f"{prefix}{user}:***@{tail}" if colon else url


def is_placeholder(value: str) -> bool:
    """Whether a value is still one of .env.example's ``REPLACE_WITH_...`` placeholders."""
    return _PLACEHOLDER.search(value) is not None


def check_database_url(url: str) -> None:
    """Refuse a DATABASE_URL libpq cannot parse, naming it with the password masked (libpq's own
    message quotes the whole string, password included), and one whose password is still
    .env.example's placeholder."""
    import psycopg.conninfo

    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigError(
            f"DATABASE_URL is not a PostgreSQL URL ({mask_password(url)}); expected "
            "postgresql://user:password@host:port/database"
        ) from None
    if is_placeholder(str(params.get("password") or "")):
        raise ConfigError(
            "DATABASE_URL: the password is still the REPLACE_WITH_... placeholder from .env.example; "
            "set SMS_SIDECAR_DB_PASSWORD in .env (e.g. openssl rand -hex 24)"
        )


class ConfigError(SidecarError, ValueError):
    """A setting is missing or malformed; the message names the variable."""

    def line(self, command: str) -> str:
        return f"sms-sidecar: {self}"  # a setting is no one command's: every command reads the same


@dataclass(frozen=True)
class AliyunConfig:
    access_key_id: str
    access_key_secret: str
    sign_name: str
    template_code: str
    template_param: str = "code"
    intl_sign_name: str | None = None
    intl_template_code: str | None = None
    endpoint: str = DEFAULT_ENDPOINT  # host[:port]
    protocol: str = "https"

    def __repr__(self) -> str:  # keep the secret out of tracebacks and debug output
        return f"AliyunConfig(access_key_id={self.access_key_id!r}, endpoint={self.endpoint!r}, ...)"


@dataclass(frozen=True)
class WorkerConfig:
    """Delivery worker tuning (SMS_WORKER_*); the defaults suit production."""

    enabled: bool = True
    concurrency: int = 64  # at most 3/4 of SMS_MAX_IN_FLIGHT, whatever this says
    # Keep above a send's worst case (12 s): a lease lost mid-send costs a reconcile before resending.
    lease_seconds: int = 30
    max_attempts: int = 5
    backoff_seconds: float = 5.0
    sweep_seconds: float = 1.0
    # Delivery receipts by QuerySendDetails, for a sidecar Aliyun cannot push to: ask about a send
    # still without a receipt this long after it (0: never), at most `receipt_poll_qps` calls a second.
    receipt_poll_after_seconds: int = 0
    receipt_poll_qps: float = 5.0

    @classmethod
    def from_env(cls, get: Callable[[str], str]) -> WorkerConfig:
        enabled = (get("SMS_WORKER_ENABLED") or "true").lower()
        if enabled not in ("true", "false", "1", "0"):
            raise ConfigError(f"SMS_WORKER_ENABLED must be true or false, not {enabled!r}")
        return cls(
            enabled=enabled in ("true", "1"),
            concurrency=_number(get, "SMS_WORKER_CONCURRENCY", cls.concurrency, int, 1, 10_000),
            lease_seconds=_number(get, "SMS_WORKER_LEASE_SECONDS", cls.lease_seconds, int, 2, 3600),
            max_attempts=_number(get, "SMS_WORKER_MAX_ATTEMPTS", cls.max_attempts, int, 1, 100),
            backoff_seconds=_number(get, "SMS_WORKER_BACKOFF_SECONDS", cls.backoff_seconds, float, 0.0, 3600.0),
            sweep_seconds=_number(get, "SMS_WORKER_SWEEP_SECONDS", cls.sweep_seconds, float, 0.05, 60.0),
            receipt_poll_after_seconds=_receipt_poll_after(get),
            receipt_poll_qps=_number(get, "SMS_WORKER_RECEIPT_POLL_QPS", cls.receipt_poll_qps, float, 0.1, 100.0),
        )


def _receipt_poll_after(get: Callable[[str], str]) -> int:
    name = "SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS"
    seconds = _number(get, name, 0, int, 0, 86_400)
    if 0 < seconds < 60:
        # Receipts usually arrive within seconds, but a carrier may take minutes: asking sooner spends
        # the account's API quota on sends that are still on their way.
        raise ConfigError(f"{name} must be 0 (off) or at least 60, not {seconds}")
    return seconds


@dataclass(frozen=True)
class GrpcConfig:
    """The gRPC drop-in for the phone-number service (GRPC_*); no port: not served."""

    port: int | None = None
    auth_token: str | None = None  # None only with allow_unauthenticated
    allow_unauthenticated: bool = False
    tls_cert_file: str | None = None  # both or neither
    tls_key_file: str | None = None

    def __repr__(self) -> str:  # keep the token out of tracebacks and debug output
        token = "set" if self.auth_token else "none"
        return f"GrpcConfig(port={self.port}, token={token}, tls={self.tls_cert_file is not None})"

    @classmethod
    def from_env(cls, get: Callable[[str], str]) -> GrpcConfig:
        port_text = get("GRPC_PORT")
        if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
            raise ConfigError(f"GRPC_PORT must be a TCP port number, not {port_text!r}")
        port = int(port_text) if port_text else None

        allow = (get("GRPC_ALLOW_UNAUTHENTICATED") or "false").lower()
        if allow not in ("true", "false", "1", "0"):
            raise ConfigError(f"GRPC_ALLOW_UNAUTHENTICATED must be true or false, not {allow!r}")
        token = get("GRPC_AUTH_TOKEN") or None
        if token is not None and not _GRPC_TOKEN.match(token):
            raise ConfigError(
                "GRPC_AUTH_TOKEN must be 16 to 512 visible ASCII characters without spaces "
                "(for example: openssl rand -hex 32)"
            )
        if port is not None and token is None and allow not in ("true", "1"):
            raise ConfigError(
                "GRPC_AUTH_TOKEN is not set: gRPC clients must send it as a bearer token "
                "(GRPC_ALLOW_UNAUTHENTICATED=true serves without one, on a private network only)"
            )

        cert, key = get("GRPC_TLS_CERT_FILE") or None, get("GRPC_TLS_KEY_FILE") or None
        if (cert is None) != (key is None):
            missing = "GRPC_TLS_KEY_FILE" if key is None else "GRPC_TLS_CERT_FILE"
            raise ConfigError(f"{missing} is not set: the TLS certificate and its key go together")
        if cert is not None and key is not None:
            _pem_file("GRPC_TLS_CERT_FILE", cert, b"CERTIFICATE-----")
            _pem_file("GRPC_TLS_KEY_FILE", key, b"PRIVATE KEY-----")
        return cls(port=port, auth_token=token, allow_unauthenticated=allow in ("true", "1"), tls_cert_file=cert,
                   tls_key_file=key)  # fmt: skip


def _pem_file(name: str, path: str, label: bytes) -> None:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if b"-----BEGIN " not in data or label not in data:
        kind = label.decode().rstrip("-").lower()
        raise ConfigError(f"{name}: {path} is not a PEM {kind} file")


def _number(get: Callable[[str], str], name: str, default: T, kind: Callable[[str], T], low: T, high: T) -> T:
    text = get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {text}")
    return value


@dataclass(frozen=True)
class Config:
    database_url: str
    hook_secrets: tuple[bytes, ...]
    provider: str  # "aliyun" or "console"
    aliyun: AliyunConfig | None
    host: str = "127.0.0.1"
    port: int = 8090
    worker: WorkerConfig = WorkerConfig()
    grpc: GrpcConfig = GrpcConfig()
    # Provider sends under way at once, hook and worker together (the hook first: see providers/base.py).
    # Above HTTP_MAX_CONNECTIONS' default, so a burst of hooks (one per connection) finds a slot.
    max_in_flight: int = 512
    # Slow clients (sidecar/slow_clients.py): seconds for each request to arrive, connections held at once.
    http_request_timeout_seconds: float = 10.0
    http_max_connections: int = 500  # serve raises its soft open-files limit to hold these and the provider's
    # `serve` only: processes sharing its port, each the whole sidecar (sidecar/cli.py serve_workers).
    workers: int = 1
    # The secret path segment of POST /aliyun/sms-report/{token} (sidecar/receipts.py); None: no endpoint.
    report_token: str | None = None

    @property
    def receipts(self) -> bool:
        """Whether delivery receipts arrive at all: pushed to us, or polled for."""
        return self.report_token is not None or self.worker.receipt_poll_after_seconds > 0

    def __repr__(self) -> str:
        secrets = len(self.hook_secrets)
        return f"Config(provider={self.provider!r}, host={self.host!r}, port={self.port}, secrets={secrets})"

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, require_database: bool = True) -> Config:
        def get(name: str) -> str:
            return env.get(name, "").strip()

        database_url = get("DATABASE_URL")
        if require_database and not database_url:
            raise ConfigError("DATABASE_URL is not set: give the PostgreSQL URL of your Supabase database")
        if database_url:
            check_database_url(database_url)

        secrets_value = get("SEND_SMS_HOOK_SECRETS") or get("SEND_SMS_HOOK_SECRET")
        secrets: tuple[bytes, ...] = ()
        if secrets_value:
            name = "SEND_SMS_HOOK_SECRETS" if get("SEND_SMS_HOOK_SECRETS") else "SEND_SMS_HOOK_SECRET"
            try:
                secrets = parse_secrets(secrets_value)
            except WebhookSecretError as exc:
                raise ConfigError(f"{name}: {exc}") from None

        provider = (get("SMS_PROVIDER") or "aliyun").lower()
        if provider not in ("aliyun", "console"):
            raise ConfigError(f"SMS_PROVIDER must be aliyun or console, not {provider!r}")

        aliyun = _aliyun(get) if provider == "aliyun" else None

        port_text = get("PORT") or "8090"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"PORT must be a TCP port number, not {port_text!r}")
        return cls(
            database_url=database_url,
            hook_secrets=secrets,
            provider=provider,
            aliyun=aliyun,
            host=get("HOST") or "127.0.0.1",
            port=int(port_text),
            worker=WorkerConfig.from_env(get),
            grpc=GrpcConfig.from_env(get),
            max_in_flight=_number(get, "SMS_MAX_IN_FLIGHT", cls.max_in_flight, int, 1, 10_000),
            http_request_timeout_seconds=_number(
                get, "HTTP_REQUEST_TIMEOUT_SECONDS", cls.http_request_timeout_seconds, float, 1.0, 300.0
            ),
            http_max_connections=_number(get, "HTTP_MAX_CONNECTIONS", cls.http_max_connections, int, 1, 100_000),
            workers=_number(get, "SMS_SIDECAR_WORKERS", cls.workers, int, 1, 256),
            report_token=_report_token(get("ALIYUN_SMS_REPORT_TOKEN")),
        )


def _report_token(token: str) -> str | None:
    if not token:
        return None
    if is_placeholder(token) or not _REPORT_TOKEN.match(token):
        raise ConfigError(
            "ALIYUN_SMS_REPORT_TOKEN must be 16 to 128 letters, digits, - or _ "
            "(for example: openssl rand -hex 24); it is the secret part of the receipt URL"
        )
    return token


def _aliyun(get: Callable[[str], str]) -> AliyunConfig:
    required = {
        name: get(name)
        for name in (
            "ALIYUN_ACCESS_KEY_ID",
            "ALIYUN_ACCESS_KEY_SECRET",
            "ALIYUN_SMS_SIGN_NAME",
            "ALIYUN_SMS_TEMPLATE_CODE",
        )
    }
    for name, value in required.items():
        if not value:
            raise ConfigError(f"{name} is not set (needed by SMS_PROVIDER=aliyun; use SMS_PROVIDER=console to develop)")
    if not _TEMPLATE_CODE.match(required["ALIYUN_SMS_TEMPLATE_CODE"]):
        raise ConfigError("ALIYUN_SMS_TEMPLATE_CODE must look like SMS_123456789")
    param = get("ALIYUN_SMS_TEMPLATE_PARAM") or "code"
    if not _PARAM_NAME.match(param):
        raise ConfigError(f"ALIYUN_SMS_TEMPLATE_PARAM must be a template variable name such as code, not {param!r}")

    intl_sign, intl_template = get("ALIYUN_SMS_INTL_SIGN_NAME") or None, get("ALIYUN_SMS_INTL_TEMPLATE_CODE") or None
    if (intl_sign is None) != (intl_template is None):
        missing = "ALIYUN_SMS_INTL_TEMPLATE_CODE" if intl_template is None else "ALIYUN_SMS_INTL_SIGN_NAME"
        raise ConfigError(f"{missing} is not set: the international sign name and template go together")
    if intl_template is not None and not _TEMPLATE_CODE.match(intl_template):
        raise ConfigError("ALIYUN_SMS_INTL_TEMPLATE_CODE must look like SMS_123456789")

    endpoint, protocol = _endpoint(get("ALIYUN_SMS_ENDPOINT"))
    return AliyunConfig(
        access_key_id=required["ALIYUN_ACCESS_KEY_ID"],
        access_key_secret=required["ALIYUN_ACCESS_KEY_SECRET"],
        sign_name=required["ALIYUN_SMS_SIGN_NAME"],
        template_code=required["ALIYUN_SMS_TEMPLATE_CODE"],
        template_param=param,
        intl_sign_name=intl_sign,
        intl_template_code=intl_template,
        endpoint=endpoint,
        protocol=protocol,
    )


def _endpoint(value: str) -> tuple[str, str]:
    """`dysmsapi.aliyuncs.com` (HTTPS) or a full URL such as `http://127.0.0.1:9100`."""
    if not value:
        return DEFAULT_ENDPOINT, "https"
    if "://" not in value:
        value = "https://" + value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ConfigError(f"ALIYUN_SMS_ENDPOINT is not a valid URL: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"ALIYUN_SMS_ENDPOINT must be a host or an http(s)://host[:port] URL, not {value!r}")
    # The SDK signs the host header, so it gets host[:port] and the scheme separately.
    return (f"{parts.hostname}:{port}" if port else parts.hostname), parts.scheme
