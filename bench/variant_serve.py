"""`sms-sidecar serve` with candidate fixes applied out of tree, for bench/variants.py.

    BENCH_VARIANT=lean,gauges .venv/bin/python bench/variant_serve.py

Same configuration (environment), app (sidecar.app.create_app), logging and uvicorn settings as
sidecar/cli.py `serve`; BENCH_VARIANT picks what differs (comma-separated):

- lean: bench/lean_provider.LeanAliyunProvider instead of the Aliyun SDK;
- warnlog: log level WARNING (the per-message INFO lines are not written);
- threads8: the provider thread pool has 8 threads instead of 32;
- gauges: the worker refreshes its queue gauges at most once per sweep interval instead of after
  every wake-up (DeliveryWorker._update_gauges).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import uvicorn

import sidecar.runtime
from sidecar.app import create_app
from sidecar.config import Config
from sidecar.logs import configure
from sidecar.worker import DeliveryWorker


def main() -> None:
    variant = {v for v in os.environ.get("BENCH_VARIANT", "").split(",") if v}
    config = Config.from_env(os.environ)
    provider = None
    if "lean" in variant:
        from lean_provider import LeanAliyunProvider

        assert config.aliyun is not None
        provider = LeanAliyunProvider(config.aliyun)
    if "threads8" in variant:

        def executor(**kwargs: Any) -> ThreadPoolExecutor:
            return ThreadPoolExecutor(**{**kwargs, "max_workers": 8})

        sidecar.runtime.ThreadPoolExecutor = executor  # type: ignore[misc,assignment]
    if "gauges" in variant:
        original = DeliveryWorker._update_gauges

        async def throttled(self: DeliveryWorker) -> None:
            now = time.monotonic()
            if now - getattr(self, "_gauges_at", 0.0) >= self.sweep_seconds:
                self._gauges_at = now  # type: ignore[attr-defined]
                await original(self)

        DeliveryWorker._update_gauges = throttled  # type: ignore[method-assign]
    configure("WARNING" if "warnlog" in variant else "INFO")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, provider), host=config.host, port=config.port, log_config=None, access_log=False,
            timeout_graceful_shutdown=10, backlog=1024,
        )
    )  # fmt: skip
    server.run()


if __name__ == "__main__":
    main()
