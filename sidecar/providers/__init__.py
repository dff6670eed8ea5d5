"""SMS providers: Aliyun for production, console for development."""

from __future__ import annotations

from sidecar.config import Config
from sidecar.providers.base import Busy, InFlight, Provider, Sms

__all__ = ["Busy", "InFlight", "Provider", "Sms", "build_provider"]


def build_provider(config: Config) -> Provider:
    if config.provider == "console":
        from sidecar.providers.console import ConsoleProvider

        return ConsoleProvider()
    from sidecar.providers.aliyun import AliyunProvider

    assert config.aliyun is not None
    return AliyunProvider(config.aliyun, max_connections=config.max_in_flight)
