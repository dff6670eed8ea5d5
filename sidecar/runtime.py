"""What a running sidecar holds: configuration, pool, provider, verifier, metrics."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.batches import Batcher
from sidecar.config import Config
from sidecar.metrics import Metrics
from sidecar.providers.base import InFlight, Provider
from sidecar.results import ResultWriter
from sidecar.webhook import WebhookVerifier

__all__ = ["HOOK_LEASE_SECONDS", "Runtime", "new_worker_id"]

# How long a hook request holds its message: its 4-second budget (hook.BUDGET_SECONDS) and a margin.
HOOK_LEASE_SECONDS = 10


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
    # Sends under way, hook and worker together; set from config.max_in_flight by lifecycle.running.
    in_flight: InFlight = field(default_factory=lambda: InFlight(256))
    results: ResultWriter = field(init=False)  # delivery results, batched: see sidecar/results.py
    begins: Batcher = field(init=False)  # the hook's sms.hook_begin calls, batched: see sidecar/hook.py

    def __post_init__(self) -> None:
        self.results = ResultWriter(self.pool)
        # At most 16 to a statement: each holds two subtransactions, and PostgreSQL tracks only 64
        # per transaction cheaply.
        self.begins = Batcher(self.pool, "select sms.hook_begin_many(%(items)s, %(worker)s, %(lease)s)",
                              max_batch=16, timeout=3.0,
                              params={"worker": self.worker_id, "lease": HOOK_LEASE_SECONDS})  # fmt: skip
