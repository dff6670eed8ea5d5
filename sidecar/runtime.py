"""What a running sidecar holds: configuration, pool, provider, verifier, metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.config import Config
from sidecar.metrics import Metrics
from sidecar.providers.base import Provider
from sidecar.webhook import WebhookVerifier

__all__ = ["Runtime", "new_worker_id"]

T = TypeVar("T")


def new_worker_id() -> str:
    """Names this process in leases and the ledger: host, pid and a random suffix for restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Runtime:
    config: Config
    pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]
    provider: Provider
    verifier: WebhookVerifier | None  # None: no secret configured, every hook request is refused
    metrics: Metrics = field(default_factory=Metrics)
    worker_id: str = field(default_factory=new_worker_id)
    # Provider calls block on the network; a pool of their own keeps them from starving anything else.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=32, thread_name_prefix="sms-send")
    )

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
