"""The Starlette application: hook target, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.config import Config
from sidecar.db import call, create_pool
from sidecar.hook import send_sms_hook
from sidecar.migrate import bundled
from sidecar.providers import Provider, build_provider
from sidecar.runtime import Runtime
from sidecar.webhook import WebhookVerifier
from sidecar.worker import DeliveryWorker

__all__ = ["create_app"]

log = logging.getLogger("sidecar")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    needed = bundled()[-1].version
    try:
        have = await call(rt.pool, "select sms.schema_version()", {}, timeout=2.0)
    except Exception as exc:  # any failure to answer is "not ready", with the reason
        return JSONResponse({"status": "unavailable", "reason": f"database: {type(exc).__name__}"}, status_code=503)
    if str(have) < needed:
        return JSONResponse(
            {"status": "unavailable", "reason": f"migrations pending: database at {have}, sidecar needs {needed}"},
            status_code=503,
        )
    return JSONResponse({"status": "ready", "schema_version": have})


async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(config: Config, provider: Provider | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = Runtime(
            config=config,
            pool=create_pool(config.database_url),
            provider=provider or build_provider(config),
            verifier=WebhookVerifier(config.hook_secrets) if config.hook_secrets else None,
        )
        if not config.hook_secrets:
            log.warning("SEND_SMS_HOOK_SECRETS is not set: the HTTP hook refuses every request")
        # Not waiting: the database may come up after us; /readyz says so meanwhile.
        await rt.pool.open(wait=False)
        warm = getattr(rt.provider, "warm_up", None)
        if warm is not None:
            await rt.run_blocking(warm)
        app.state.runtime = rt
        grpc_server = None
        if config.grpc.port is not None:
            from sidecar.grpc_api.server import GrpcServer  # the [grpc] extra: imported only when configured

            grpc_server = GrpcServer(rt, config.host, config.grpc.port)
            await grpc_server.start()
        stop = asyncio.Event()
        worker_task = None
        if config.worker.enabled:
            worker = DeliveryWorker(rt, config.worker)
            worker_task = asyncio.create_task(worker.run(stop), name="sms-delivery-worker")
        log.info("sidecar started", extra={"provider": rt.provider.name, "worker": rt.worker_id})
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()  # before the worker: calls in flight wait for their delivery
            stop.set()
            if worker_task is not None:
                await worker_task
            await rt.pool.close()
            rt.executor.shutdown(wait=False, cancel_futures=True)
            log.info("sidecar stopped", extra={"worker": rt.worker_id})

    return Starlette(
        routes=[
            Route("/hooks/send-sms", send_sms_hook, methods=["POST"]),
            Route("/functions/v1/supabase-aliyun-sms-sender", send_sms_hook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
