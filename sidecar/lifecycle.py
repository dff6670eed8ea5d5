"""What every sidecar process starts and stops, in order: pool, provider, gRPC, delivery worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sidecar.config import Config
from sidecar.db import create_pool
from sidecar.providers import InFlight, Provider, build_provider
from sidecar.runtime import Runtime
from sidecar.webhook import WebhookVerifier
from sidecar.worker import DeliveryWorker

__all__ = ["running"]

log = logging.getLogger("sidecar")


@asynccontextmanager
async def running(
    config: Config, provider: Provider | None = None, grpc_port: int | None = None
) -> AsyncIterator[Runtime]:
    rt = Runtime(
        config=config,
        pool=create_pool(config.database_url),
        provider=provider or build_provider(config),
        verifier=WebhookVerifier(config.hook_secrets) if config.hook_secrets else None,
        in_flight=InFlight(config.max_in_flight),
    )
    # Not waiting: the database may come up after us; /readyz and gRPC health say so meanwhile.
    await rt.pool.open(wait=False)
    await rt.provider.start()
    grpc_server = None
    stop = asyncio.Event()
    worker_task = None
    try:
        if grpc_port is not None:
            from sidecar.grpc_api.server import GrpcServer  # the [grpc] extra: imported only when configured

            grpc_server = GrpcServer(rt, config.host, grpc_port)
            await grpc_server.start()
        if config.worker.enabled:
            worker_task = asyncio.create_task(DeliveryWorker(rt, config.worker).run(stop), name="sms-delivery-worker")
        extra = {"provider": rt.provider.name, "worker": rt.worker_id}
        log.info("sidecar started", extra=extra | ({"grpc": grpc_server.address} if grpc_server else {}))
        yield rt
    finally:
        if grpc_server is not None:
            await grpc_server.stop()  # before the worker: calls in flight wait for their delivery
        stop.set()
        if worker_task is not None:
            await worker_task
        await rt.provider.close()
        await rt.pool.close()
        log.info("sidecar stopped", extra={"worker": rt.worker_id})
