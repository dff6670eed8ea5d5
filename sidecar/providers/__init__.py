"""SMS providers: Aliyun for production, console for development."""

from __future__ import annotations

from sidecar.config import Config
from sidecar.providers.base import Outcome, Provider, SendResult, Sms, Timeouts

__all__ = ["Outcome", "Provider", "SendResult", "Sms", "Timeouts", "build_provider"]


def build_provider(config: Config) -> Provider:
    if config.provider == "console":
        from sidecar.providers.console import ConsoleProvider

        return ConsoleProvider()
    from sidecar.providers.aliyun import AliyunProvider

    assert config.aliyun is not None
    return AliyunProvider(config.aliyun)
