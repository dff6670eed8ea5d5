"""The sidecar under attack, one per module: in process (`hook`) and under uvicorn (`served`)."""

from __future__ import annotations

from collections.abc import Iterator

import anyio.from_thread
import pytest

from tests.support.database import Database, drain_queue
from tests.support.fake_aliyun import FakeAliyun
from tests.support.hostile import InProcess, sidecar_app
from tests.support.servers import run_app


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeAliyun) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def hook(database: Database, fake: FakeAliyun) -> Iterator[InProcess]:
    drain_queue(database)
    app = sidecar_app(database, fake)
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            sidecar = InProcess(app, portal)
            try:
                yield sidecar
            finally:
                portal.call(sidecar.client.aclose)


@pytest.fixture(scope="module")
def served(database: Database, fake: FakeAliyun) -> Iterator[str]:
    """The same app under uvicorn, for what only a real socket can do."""
    drain_queue(database)
    with run_app(sidecar_app(database, fake)) as url:
        yield url
