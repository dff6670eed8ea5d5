"""The Alibaba Cloud side of a test: one account, the `fake` fixture serving it, and the sidecar's
configuration (in process) and environment (out of process) pointing at that fake; `in_process`
runs the whole sidecar against it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.app import create_app
from sidecar.config import AliyunConfig, Config, WorkerConfig
from sidecar.providers.aliyun import AliyunProvider
from tests.support.builders import without_send_limits
from tests.support.database import Database, drain_queue
from tests.support.fake_aliyun import FakeAliyun
from tests.support.servers import run_app, sidecar_url

AK, AK_SECRET = "LTAI-test-key", "test-key-secret"
SIGN, TEMPLATE = "阿里云短信测试", "SMS_154950909"
INTL_SIGN, INTL_TEMPLATE = "Intl Sign", "SMS_200000001"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAliyun]:
    """One fake Aliyun per test module, accepting only AK/AK_SECRET; modules reset it between tests."""
    with FakeAliyun(credentials={AK: AK_SECRET}) as server:
        yield server


@pytest.fixture
def isolated(fake: FakeAliyun, database: Database, settings: Any) -> None:
    """For modules whose sidecar delivers: no other module's queued codes, a fresh fake, no send limits."""
    fake.reset()
    drain_queue(database)
    without_send_limits(settings)


def aliyun_config(endpoint: str, *, protocol: str = "http", **fields: Any) -> AliyunConfig:
    """The account above at `endpoint`; `fields` override the sign name, template and the rest."""
    values: dict[str, Any] = {"access_key_id": AK, "access_key_secret": AK_SECRET, "sign_name": SIGN,
                              "template_code": TEMPLATE, **fields}  # fmt: skip
    return AliyunConfig(endpoint=endpoint, protocol=protocol, **values)


def aliyun_env(fake: FakeAliyun, *, sign: str = SIGN, template: str = TEMPLATE) -> dict[str, str]:
    """The ALIYUN_* variables `sms-sidecar` reads for the same account, sending to `fake`."""
    return {"ALIYUN_ACCESS_KEY_ID": AK, "ALIYUN_ACCESS_KEY_SECRET": AK_SECRET,
            "ALIYUN_SMS_SIGN_NAME": sign, "ALIYUN_SMS_TEMPLATE_CODE": template,
            "ALIYUN_SMS_ENDPOINT": fake.url}  # fmt: skip


def in_process(database: Database, fake: FakeAliyun, *, worker: dict[str, Any] | None = None, **fields: Any) -> Any:
    """The real sidecar app (hook, delivery worker, receipts) under uvicorn in this process, as sms_sidecar,
    sending to `fake`; a context manager giving its base URL. The worker retries at once and sweeps every
    0.2 s unless `worker` says otherwise; `fields` are Config's (report_token, hook_secrets...)."""
    aliyun = aliyun_config(fake.endpoint)
    worker_config = WorkerConfig(**{"backoff_seconds": 0.0, "sweep_seconds": 0.2, **(worker or {})})
    config = Config(database_url=sidecar_url(database), provider="aliyun", aliyun=aliyun, worker=worker_config,
                    **{"hook_secrets": (), **fields})  # fmt: skip
    return run_app(create_app(config, AliyunProvider(aliyun)))
