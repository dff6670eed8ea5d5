"""The Starlette application: hook target, delivery receipts, health, readiness and metrics."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.config import Config
from sidecar.errors import failure_name
from sidecar.hook import send_sms_hook
from sidecar.lifecycle import ServiceFactory, running
from sidecar.providers import Provider
from sidecar.receipts import report_route
from sidecar.runtime import Runtime
from sidecar.store import required_schema_version, schema_is_current

__all__ = ["create_app", "from_environment"]

log = logging.getLogger("sidecar")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    needed = required_schema_version()
    try:
        have = await rt.store.schema_version(timeout=2.0)
    except Exception as exc:  # any failure to answer is "not ready", with the reason
        return JSONResponse({"status": "unavailable", "reason": f"database: {failure_name(exc)}"}, status_code=503)
    if not schema_is_current(have):
        return JSONResponse(
            {"status": "unavailable", "reason": f"migrations pending: database at {have}, sidecar needs {needed}"},
            status_code=503,
        )
    return JSONResponse({"status": "ready", "schema_version": have})


async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _services(config: Config) -> list[ServiceFactory]:
    """The gRPC server too when GRPC_PORT is set."""
    if config.grpc.port is None:
        return []
    from sidecar.grpc_api.server import grpc_service  # the [grpc] extra: imported only when configured

    return [grpc_service(config.host, config.grpc.port)]


def create_app(config: Config, provider: Provider | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not config.hook_secrets:
            log.warning("SEND_SMS_HOOK_SECRETS is not set: the HTTP hook refuses every request")
        async with running(config, provider, _services(config)) as rt:
            app.state.runtime = rt
            yield

    return Starlette(
        routes=[
            Route("/hooks/send-sms", send_sms_hook, methods=["POST"]),
            Route("/functions/v1/supabase-aliyun-sms-sender", send_sms_hook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            report_route(),
        ],
        lifespan=lifespan,
    )


def from_environment() -> Starlette:
    """The app of each `serve --workers N` process. uvicorn starts a worker from an import string
    (`sidecar.app:from_environment`), not a Config, so the worker reads the environment it inherited,
    as `serve` did (sidecar/cli.py puts the command line's settings there first)."""
    from sidecar.logs import configure

    configure()  # a new process: the parent's logging is not inherited
    return create_app(Config.from_env(os.environ))
