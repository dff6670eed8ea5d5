"""`phonenumberservice.PhoneNumberService` over gRPC: a drop-in for the Go phone-number service.

SendSMS issues a code through `sms.grpc_send_code` and then, as the original answered only after
texting, waits for the delivery worker's outcome (`sms.message_state`). Valid checks a code through
`sms.grpc_verify_code`. Both need `authorization: Bearer <GRPC_AUTH_TOKEN>` call metadata; the
health (grpc.health.v1, SERVING while the database answers) and reflection services need none.

Run by `sms-sidecar grpc` (with the delivery worker) or by `sms-sidecar serve` when GRPC_PORT is set.
Needs the [grpc] extra: `pip install 'supabase-aliyun-sms[grpc]'`.

The stubs beside this file (phonenumberservice_pb2.py, .pyi and _pb2_grpc.py) are generated from
phonenumberservice.proto and checked in. After changing the .proto, regenerate them with
`scripts/gen_grpc.sh`, which pins the grpcio-tools release so the stubs keep running on the extra's
oldest grpcio and protobuf.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.db import ApiError
from sidecar.errors import DatabaseUnavailable, SidecarError, failure_name
from sidecar.grpc_api import phonenumberservice_pb2 as pb, phonenumberservice_pb2_grpc as pb_grpc
from sidecar.logs import mask_phone
from sidecar.outcomes import Kind
from sidecar.runtime import Runtime
from sidecar.store import MessageStatus, schema_is_current

__all__ = ["DEFAULT_PORT", "SERVICE_NAME", "GrpcBindError", "GrpcServer", "PhoneNumberService", "grpc_service"]

T = TypeVar("T")

log = logging.getLogger("sidecar.grpc")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["PhoneNumberService"].full_name
DEFAULT_PORT = 50511  # the Go service's port

POLL_SECONDS = 0.05  # how often SendSMS looks at its message while the worker sends it
MAX_WAIT_SECONDS = 8.0  # longest SendSMS waits for the provider's answer
DEADLINE_MARGIN = 0.2  # answer this long before the caller's deadline, so the answer reaches it
DB_TIMEOUT_SECONDS = 5.0
HEALTH_INTERVAL = 1.0
SHUTDOWN_GRACE = MAX_WAIT_SECONDS + 2.0  # calls in flight may be waiting for a delivery

_register: Callable[[object, Any], None] = pb_grpc.add_PhoneNumberServiceServicer_to_server


class GrpcBindError(SidecarError, OSError):
    """The gRPC address cannot be listened on (in use, or not an address of this host)."""


async def _abort(context: Any, code: Any, details: str, retry_after: int | None = None) -> NoReturn:
    trailing = (("retry-after", str(retry_after)),) if retry_after is not None else ()
    await context.abort(code, details, trailing)
    raise AssertionError("context.abort returned")  # it raises; this keeps the type checker informed


class PhoneNumberService:
    """The servicer: SendSMS and Valid with the Go service's messages and semantics."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        token = rt.config.grpc.auth_token
        self._token = token.encode() if token else None
        aliyun = rt.config.aliyun
        # Clients of the original name the sign and template in every call; the configured pair means "default".
        self._default_pair = (
            (aliyun.sign_name, aliyun.template_code) if rt.config.provider == "aliyun" and aliyun is not None else None
        )

    async def SendSMS(self, request: pb.SendSMSRequest, context: Any) -> pb.Empty:
        await self._authorize(context)
        deadline = _deadline(context)
        phone, sign, template = request.phone_number.strip(), request.signature.strip(), request.template_code.strip()
        if not phone:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "phone_number is required")
        if bool(sign) != bool(template):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "signature and template_code go together: give both, or neither for the defaults")  # fmt: skip
        pair = None if not sign or (sign, template) == self._default_pair else (sign, template)
        fields = {"phone": mask_phone(phone), "template": pair[1] if pair else "default"}
        try:
            message_id = await self._db(context, lambda timeout: self.rt.store.grpc_send_code(
                phone, pair[0] if pair else None, pair[1] if pair else None, timeout), deadline, fields)  # fmt: skip
        except ApiError as exc:
            if exc.status == 429:
                wait = exc.retry_after or 60
                log.info("SendSMS rate limited", extra={**fields, "retry_after": wait})
                await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"too many codes for this number, retry after {wait} s: {exc.message}", wait)  # fmt: skip
            log.info("SendSMS refused", extra={**fields, "reason": exc.code})
            code = grpc.StatusCode.INVALID_ARGUMENT if exc.status == 400 else grpc.StatusCode.FAILED_PRECONDITION
            await _abort(context, code, f"{exc.code}: {exc.message}")
        if message_id is None:  # nothing to deliver (a test number's message is recorded as sent)
            return pb.Empty()
        await self._await_delivery(context, message_id, deadline, fields)
        return pb.Empty()

    async def _await_delivery(self, context: Any, message_id: str, deadline: float, fields: dict[str, Any]) -> None:
        """Answer as the original did, after the provider took the SMS (or refused it)."""
        wait_until = min(deadline, time.monotonic() + MAX_WAIT_SECONDS)
        state = await self._db(
            context,
            lambda _: self.rt.store.wait_for_state(message_id, lambda s: s.status in _SETTLED, until=wait_until,
                                                   deadline=wait_until, poll=POLL_SECONDS,
                                                   max_timeout=DB_TIMEOUT_SECONDS),
            wait_until, fields,
            unavailable="the database became unavailable before the delivery was confirmed; the code may still arrive",
        )  # fmt: skip
        status, provider_code = state.status, state.provider_code
        if status == MessageStatus.SENT:
            log.info("SendSMS delivered to the provider", extra={**fields, "provider_code": provider_code})
            return
        if status == MessageStatus.FAILED:
            result = self.rt.provider.classify(provider_code, state.error)
            log.warning("SendSMS failed", extra={**fields, "provider_code": provider_code})
            details = f"the SMS was not sent ({provider_code}): {state.error or 'no detail'}"
            wait = result.retry_after or 60 if result.kind is Kind.RATE_LIMITED else None
            await _abort(context, _FAILED_STATUS.get(result.kind, grpc.StatusCode.UNAVAILABLE), details, wait)
        last = f", last attempt: {provider_code}" if provider_code else ""
        log.warning("SendSMS: delivery not confirmed in time",
                    extra={**fields, "status": status, "provider_code": provider_code})  # fmt: skip
        await _abort(context, grpc.StatusCode.UNAVAILABLE,
                     f"delivery is not confirmed yet (message {status}{last}); the code may still arrive")  # fmt: skip

    async def Valid(self, request: pb.ValidRequest, context: Any) -> pb.ValidResponse:
        await self._authorize(context)
        phone, code = request.phone_number.strip(), request.code.strip()
        if not phone or not code:
            return pb.ValidResponse(valid=False)
        fields = {"phone": mask_phone(phone)}
        try:
            checked = await self._db(context, lambda timeout: self.rt.store.grpc_verify_code(phone, code, timeout),
                                     _deadline(context), fields)  # fmt: skip
        except ApiError as exc:  # a malformed number or code: the original answered false
            log.info("Valid: refused input", extra={**fields, "reason": exc.code})
            return pb.ValidResponse(valid=False)
        log.info("Valid checked", extra={**fields, "valid": checked.valid, "reason": checked.reason})
        return pb.ValidResponse(valid=checked.valid)

    async def _authorize(self, context: Any) -> None:
        if self._token is None:  # GRPC_ALLOW_UNAUTHENTICATED=true and no token
            return
        for key, value in context.invocation_metadata() or ():
            if key != "authorization":
                continue
            scheme, _, credentials = str(value).strip().partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token):
                return
        await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid authorization: Bearer token")

    async def _db(
        self,
        context: Any,
        work: Callable[[float], Awaitable[T]],
        deadline: float,
        fields: dict[str, Any],
        unavailable: str = "the database is unavailable, try again",
    ) -> T:
        """`work(timeout)`, answered by `deadline`; only ApiError (the SQL core's refusals) reaches the caller."""
        timeout = max(0.05, min(DB_TIMEOUT_SECONDS, deadline - time.monotonic()))
        try:
            return await work(timeout)
        except psycopg.errors.InsufficientPrivilege:
            # The operator has not given this login the gRPC role (least privilege: docs/grpc-migration.md).
            log.error("gRPC call: the database login may not act as sms_grpc; run: grant sms_grpc to <login>",
                      extra=fields)  # fmt: skip
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         "the sidecar's database login lacks the sms_grpc role")  # fmt: skip
        except DatabaseUnavailable as exc:
            log.warning("gRPC call: database unavailable", extra={**fields, "error": failure_name(exc)})
            await _abort(context, grpc.StatusCode.UNAVAILABLE, unavailable)
        except psycopg.Error as exc:  # a bug or a schema out of step: not the caller's to retry
            log.error(
                "gRPC call: database error", extra={**fields, "error": type(exc).__name__, "sqlstate": exc.sqlstate}
            )
            await _abort(context, grpc.StatusCode.INTERNAL, f"database error ({type(exc).__name__})")


# How a failed SMS is reported, by what went wrong: a bad number is the caller's, a rate limit (which
# also carries retry-after) says when to come back, and the rest is worth retrying.
_FAILED_STATUS: dict[Kind | None, Any] = {Kind.BAD_NUMBER: grpc.StatusCode.INVALID_ARGUMENT,
                                          Kind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
_SETTLED = (MessageStatus.SENT, MessageStatus.FAILED)


def _deadline(context: Any) -> float:
    """When this call must have answered, as time.monotonic(): the caller's deadline less a margin."""
    remaining = context.time_remaining()
    budget = MAX_WAIT_SECONDS + DB_TIMEOUT_SECONDS if remaining is None else remaining - DEADLINE_MARGIN
    return time.monotonic() + budget


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """The gRPC server inside a sidecar process: the phone-number service, health and reflection."""

    def __init__(self, rt: Runtime, host: str, port: int) -> None:
        self.rt = rt
        self.name = "grpc"
        self.address = _address(host, port)
        self.health = health.aio.HealthServicer()
        self._server: Any = None
        self._health_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None

    async def start(self) -> None:
        """Listens and serves; raises OSError when the address cannot be bound."""
        grpc_config = self.rt.config.grpc
        # Without this, Linux lets a second server bind the same port and the two share the calls.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        _register(PhoneNumberService(self.rt), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        try:
            if grpc_config.tls_cert_file and grpc_config.tls_key_file:
                with open(grpc_config.tls_key_file, "rb") as key, open(grpc_config.tls_cert_file, "rb") as cert:
                    credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
                bound = server.add_secure_port(self.address, credentials)
            else:
                bound = server.add_insecure_port(self.address)
        except RuntimeError:  # recent grpcio raises where older releases returned 0
            bound = 0
        if not bound:
            raise GrpcBindError(f"cannot listen on {self.address}: the port is in use or the address is not here")
        await self._set_health(False)  # until the database has answered
        await server.start()
        self._server = server
        self._health_task = asyncio.create_task(self._watch_health(), name="grpc-health")
        if grpc_config.auth_token is None:
            log.warning("the gRPC API accepts calls without a token (GRPC_ALLOW_UNAUTHENTICATED=true)")
        log.info("gRPC server listening", extra={"address": self.address, "tls": bool(grpc_config.tls_cert_file)})

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Says NOT_SERVING, refuses new calls and lets those in flight finish within `grace` seconds."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        log.info("gRPC server stopped", extra={"address": self.address})

    async def _watch_health(self) -> None:
        while True:
            await self._set_health(await self._database_ready())
            await asyncio.sleep(HEALTH_INTERVAL)

    async def _database_ready(self) -> bool:
        """As /readyz: the database answers and has every migration this sidecar needs."""
        try:
            have = await self.rt.store.schema_version(timeout=2.0, bound=2.5)
        except Exception:  # whatever keeps the database from answering makes the service unusable
            return False
        return schema_is_current(have)

    async def _set_health(self, serving: bool) -> None:
        if serving == self._serving:
            return
        if self._serving is not None:
            level, name = (logging.INFO, "SERVING") if serving else (logging.WARNING, "NOT_SERVING")
            log.log(level, "gRPC health: %s", name)
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):  # "" is the server as a whole
            await self.health.set(service, status)


def grpc_service(host: str, port: int | None) -> Callable[[Runtime], GrpcServer]:
    """The gRPC server as a service of sidecar/lifecycle.py (`port` None: the Go service's)."""
    return lambda rt: GrpcServer(rt, host, port or DEFAULT_PORT)
