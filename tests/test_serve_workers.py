"""`sms-sidecar serve --workers N`: N processes on one port, each the whole sidecar (HTTP, provider,
delivery worker), configured from the environment and the command line, stopped together by SIGTERM."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.aliyun import aliyun_env
from tests.support.builders import fresh_phone
from tests.support.database import Database
from tests.support.fake_aliyun import Delay, FakeAliyun
from tests.support.gotrue import GoTrueHookCaller, generate_secret, otp_login
from tests.support.postgrest import SERVICE, PostgREST
from tests.support.servers import SidecarProcess, free_port, sidecar_url, wait_until

pytestmark = pytest.mark.usefixtures("isolated")

SECRET = generate_secret()
CAP = 3  # HTTP_MAX_CONNECTIONS, per worker
BOUND = 2.5  # HTTP_REQUEST_TIMEOUT_SECONDS
# The installed script, as the image runs it: uvicorn's workers are spawned, and re-import its main module.
SCRIPT = str(Path(sys.executable).with_name("sms-sidecar"))


def log_lines(sidecar: SidecarProcess, message: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line["message"] == message]


def first_answers(socks: list[socket.socket], timeout: float = BOUND + 5) -> list[tuple[float, bytes]]:
    """For each socket, sending nothing: when the server first answered or closed it (seconds since
    now), and its first 13 bytes (b"" for a close or reset)."""
    opened, answers = time.monotonic(), {}
    while len(answers) < len(socks) and time.monotonic() - opened < timeout:
        readable, _, _ = select.select([s for s in socks if s not in answers], [], [], 0.1)
        for sock in readable:
            try:
                answers[sock] = (time.monotonic() - opened, sock.recv(13))
            except OSError:  # reset
                answers[sock] = (time.monotonic() - opened, b"")
    for sock in socks:
        sock.close()
    return [answers.get(sock, (timeout, b"still open")) for sock in socks]


def is_running(pid: int) -> bool:
    return bool(subprocess.run(["ps", "-o", "pid=", "-p", str(pid)], capture_output=True, text=True).stdout.strip())


def test_two_workers_serve_share_the_queue_and_stop_together(
    api: PostgREST, database: Database, fake: FakeAliyun
) -> None:
    env = {
        "DATABASE_URL": sidecar_url(database), "SEND_SMS_HOOK_SECRETS": SECRET, "SMS_PROVIDER": "aliyun",
        **aliyun_env(fake, sign="签名", template="SMS_1"), "SMS_WORKER_SWEEP_SECONDS": "0.2",
        "SMS_WORKER_BACKOFF_SECONDS": "0", "SMS_WORKER_CONCURRENCY": "4",
        "HTTP_MAX_CONNECTIONS": str(CAP), "HTTP_REQUEST_TIMEOUT_SECONDS": str(BOUND),
    }  # fmt: skip
    sidecar = SidecarProcess(env, args=("serve", "--workers", "2", "--host", "127.0.0.1", "--port", "{port}"),
                             command=[SCRIPT])  # fmt: skip
    sidecar.env.update(HOST="192.0.2.1", PORT=str(free_port()))  # not these: the command line's
    with sidecar:
        wait_until(lambda: len(log_lines(sidecar, "sidecar started")) == 2, 20, "both workers")
        workers = {line["worker"] for line in log_lines(sidecar, "sidecar started")}
        pids = {int(worker.split(":")[1]) for worker in workers}
        assert sidecar.process is not None and len(pids) == 2 and sidecar.process.pid not in pids
        (serving,) = log_lines(sidecar, "serving HTTP")
        assert (serving["workers"], serving["address"]) == (2, f"127.0.0.1:{sidecar.port}")

        assert httpx.get(sidecar.url + "/healthz", timeout=5).json() == {"status": "ok"}
        phone = fresh_phone()
        result = GoTrueHookCaller(sidecar.url + "/hooks/send-sms", SECRET).call(otp_login("2.196.0", phone=phone))
        assert result.outcome == "success", result
        assert [sent.phone_numbers for sent in fake.wait_for_sends(1)] == [phone[2:]]

        # Every worker holds its slow-client bounds: at most CAP connections each, the rest refused at
        # once, and a connection that sends nothing is closed after BOUND seconds.
        answers = first_answers([socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(4 * CAP)])
        assert all(data in (b"", b"HTTP/1.1 503 ") for _, data in answers), answers
        assert sum(after < 1 for after, _ in answers) >= 2 * CAP, answers  # refused at once
        assert max(after for after, _ in answers) < BOUND + 2, answers  # the held ones cut at the bound

        # Both delivery workers drain the outbox; SIGTERM finishes or releases what they hold.
        fake.reset()
        fake.set_default(Delay(0.2))
        phones = [fresh_phone() for _ in range(40)]
        for number in phones:
            assert api.rpc("request_phone_code", {"phone": number}, SERVICE).status == 200
        fake.wait_for_sends(8, timeout=20)
        started = time.monotonic()
        assert sidecar.kill(signal.SIGTERM) == 0
        assert time.monotonic() - started < 15
        assert {line["worker"] for line in log_lines(sidecar, "sidecar stopped")} == workers
        assert not log_lines(sidecar, "could not release claimed messages")
        assert not any(is_running(pid) for pid in pids)
    holding = "select count(*) from sms.outbox where phone = any(%s) and status = 'sending'"
    assert database.one(holding, [phones]) == 0
    senders = database.one(
        "select array_agg(distinct d.worker) from sms.deliveries as d join sms.outbox as o on o.id = d.message_id"
        " where o.phone = any(%s)", [phones],
    )  # fmt: skip
    assert set(senders) == workers
    assert Counter("86" + sent.phone_numbers for sent in fake.sends).most_common(1)[0][1] == 1


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--workers", "0"], {}, "SMS_SIDECAR_WORKERS must be between 1 and 256, not 0"),
    ([], {"SMS_SIDECAR_WORKERS": "many"}, "SMS_SIDECAR_WORKERS must be a number, not 'many'"),
    (["--workers", "2"], {"GRPC_PORT": "50511", "GRPC_ALLOW_UNAUTHENTICATED": "true"}, "GRPC_PORT is served by one"),
])  # fmt: skip
def test_the_worker_count_is_checked(args: list[str], env: dict[str, str], message: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "GRPC_"))}
    result = subprocess.run(
        [SCRIPT, "serve", *args], env={**base, "DATABASE_URL": "postgresql:///x", "SMS_PROVIDER": "console", **env},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0 and message in result.stderr, result.stderr
