"""What a running sidecar holds: configuration, pool and its statements, provider, verifier, metrics."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from sidecar.config import Config
from sidecar.metrics import Metrics
from sidecar.providers.base import InFlight, Provider
from sidecar.store import Pool, Store
from sidecar.webhook import WebhookVerifier

__all__ = ["Runtime", "new_worker_id"]


def new_worker_id() -> str:
    """Names this process in leases and the ledger: host, pid and a random suffix for restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Runtime:
    config: Config
    pool: Pool
    provider: Provider
    verifier: WebhookVerifier | None  # None: no secret configured, every hook request is refused
    metrics: Metrics = field(default_factory=Metrics)
    worker_id: str = field(default_factory=new_worker_id)
    in_flight: InFlight = field(init=False)  # sends under way, hook and worker together (SMS_MAX_IN_FLIGHT)
    store: Store = field(init=False)  # every statement this process runs: see sidecar/store.py

    def __post_init__(self) -> None:
        self.in_flight = InFlight(self.config.max_in_flight)
        self.store = Store(self.pool, self.config.database_url, self.worker_id)
