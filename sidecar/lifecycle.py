"""What every sidecar process holds while it runs, started and stopped in order: pool, provider, the
services it was given (the gRPC server), delivery worker and receipt poller. Which services a
command runs is sidecar/process.py's to say."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from sidecar.config import Config
from sidecar.db import create_pool
from sidecar.providers import Provider, build_provider
from sidecar.receipt_poll import ReceiptPoller
from sidecar.runtime import Runtime
from sidecar.webhook import WebhookVerifier
from sidecar.worker import DeliveryWorker

__all__ = ["Service", "ServiceFactory", "running"]

log = logging.getLogger("sidecar")


class Service(Protocol):
    """Runs beside the hook and the worker; named in the start-up log by its address."""

    name: str
    address: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServiceFactory = Callable[[Runtime], Service]


@asynccontextmanager
async def running(
    config: Config, provider: Provider | None = None, services: Sequence[ServiceFactory] = ()
) -> AsyncIterator[Runtime]:
    rt = Runtime(
        config=config,
        pool=create_pool(config.database_url),
        provider=provider or build_provider(config),
        verifier=WebhookVerifier(config.hook_secrets) if config.hook_secrets else None,
    )
    # Not waiting: the database may come up after us; /readyz and gRPC health say so meanwhile.
    await rt.pool.open(wait=False)
    await rt.provider.start()
    started: list[Service] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        for make in services:
            started.append(service := make(rt))  # stopped even if its start fails half-way
            await service.start()
        if config.worker.enabled:
            tasks.append(asyncio.create_task(DeliveryWorker(rt, config.worker).run(stop), name="sms-delivery-worker"))
            if config.worker.receipt_poll_after_seconds:
                poller = ReceiptPoller(rt, config.worker.receipt_poll_after_seconds, config.worker.receipt_poll_qps)
                tasks.append(asyncio.create_task(poller.run(stop), name="sms-receipt-poll"))
        extra = {"provider": rt.provider.name, "worker": rt.worker_id}
        log.info("sidecar started", extra=extra | {s.name: s.address for s in started})
        yield rt
    finally:
        for service in reversed(started):
            await service.stop()  # before the worker: gRPC calls in flight wait for their delivery
        stop.set()
        for task in tasks:
            await task
        await rt.provider.close()
        await rt.pool.close()
        log.info("sidecar stopped", extra={"worker": rt.worker_id})
