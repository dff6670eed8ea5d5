"""The newcomer commands: `sms-sidecar dev` end to end, `sms-sidecar check`, and their failures."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.localpg import PostgresNotFound, find_bindir
from tests.support.aliyun import AK_SECRET, aliyun_env
from tests.support.database import Database
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import generate_secret
from tests.support.servers import free_port, sidecar_url


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 60) -> str:
    assert process.stdout is not None
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(seen)}")


@pytest.fixture
def dev() -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "ALIYUN_", "SEND_SMS", "SMS_"))}
    env.update(PORT=str(free_port()), PATH=f"{find_bindir()}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "dev"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        yield process, read_until(process, "Ctrl-C stops")
    finally:
        if process.poll() is None:  # SIGTERM, so that it removes its cluster; SIGKILL would orphan it
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


def shell(command: str) -> str:
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dev_runs_the_whole_flow_and_cleans_up(dev: tuple[subprocess.Popen[str], str]) -> None:
    process, welcome = dev
    datadir = Path(re.search(r"data in (\S+)\)", welcome).group(1))  # type: ignore[union-attr]
    assert datadir.exists()
    commands = [line.strip() for line in welcome.splitlines()]
    hook = next(c for c in commands if c.startswith("python3 -c"))
    request, verify = (c for c in commands if c.startswith("psql"))

    assert shell(hook).strip() == "{}"  # the printed, signed hook call is accepted
    read_until(process, "hook SMS accepted")
    shell(request)
    printed = read_until(process, "[console SMS]")
    code = re.findall(r"\[console SMS\] to \+86\*+8000 .*code (\d{6})", printed)[-1]
    assert '{"valid": true}' in shell(verify.replace("<code printed below>", code))

    process.send_signal(signal.SIGINT)
    assert "Stopped; the throwaway database is gone." in read_until(process, "Stopped")
    process.wait(20)
    assert not datadir.exists()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_dev_leaves_no_database_behind_however_it_is_stopped(
    dev: tuple[subprocess.Popen[str], str], stop: signal.Signals
) -> None:
    process, welcome = dev
    datadir = Path(re.search(r"data in (\S+)\)", welcome).group(1))  # type: ignore[union-attr]
    port = int(re.search(r"PostgreSQL on 127\.0\.0\.1:(\d+)", welcome).group(1))  # type: ignore[union-attr]
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    process.send_signal(stop)
    read_until(process, "Stopped; the throwaway database is gone.")
    assert process.wait(20) == 0
    assert not datadir.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_dev_says_how_a_container_reaches_it(dev: tuple[subprocess.Popen[str], str]) -> None:
    _, welcome = dev
    assert "GOTRUE_HOOK_SEND_SMS_URI=http://host.docker.internal:" in welcome
    assert "HOST=0.0.0.0 sms-sidecar dev" in welcome and "host-gateway" in welcome


def test_without_postgres_binaries_the_error_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(PostgresNotFound, match="apt-get install postgresql-15"):
        find_bindir(search_root=tmp_path, path=str(tmp_path), homebrew_prefixes=(tmp_path,))


def fake_tool(path: Path, script: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_server_binaries_are_found_through_pg_config(tmp_path: Path) -> None:
    bindir = fake_tool(tmp_path / "pg" / "bin" / "initdb").parent
    fake_tool(tmp_path / "path" / "pg_config", f"echo {bindir}")
    assert find_bindir(search_root=tmp_path / "none", path=str(tmp_path / "path"), homebrew_prefixes=()) == bindir


def test_server_binaries_are_found_in_homebrews_keg_only_postgresql_15(tmp_path: Path) -> None:
    fake_tool(tmp_path / "usr-local" / "opt" / "postgresql" / "bin" / "initdb")
    keg = fake_tool(tmp_path / "opt-homebrew" / "opt" / "postgresql@15" / "bin" / "initdb").parent
    prefixes = (tmp_path / "usr-local", tmp_path / "opt-homebrew")
    assert find_bindir(search_root=tmp_path, path=str(tmp_path / "empty"), homebrew_prefixes=prefixes) == keg


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "ALIYUN_", "SEND_SMS", "SMS_"))}
    return subprocess.run([sys.executable, "-m", "sidecar", "check"], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def live_env(database: Database, fake: FakeAliyun, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": sidecar_url(database), "SEND_SMS_HOOK_SECRETS": generate_secret(),
        **aliyun_env(fake, sign="签名", template="SMS_1"), **extra,
    }  # fmt: skip


REPORT_TOKEN = "check-report-token-0123456789"


def test_check_passes_on_a_ready_deployment(database: Database, fake: FakeAliyun) -> None:
    result = check(live_env(database, fake, ALIYUN_SMS_REPORT_TOKEN=REPORT_TOKEN))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert [line.split(":")[0].split()[-1] for line in lines] == [
        "configuration", "database", "migrations", "grants", "numbers", "aliyun", "receipts",
    ]  # fmt: skip
    assert all(line.startswith("ok") for line in lines)
    assert AK_SECRET not in result.stdout and REPORT_TOKEN not in result.stdout
    assert "POST /aliyun/sms-report/<ALIYUN_SMS_REPORT_TOKEN>" in lines[-1] and "HTTP 批量推送" in lines[-1]


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ({}, "warn  receipts: off: phone_code_status reports delivered null"),
        ({"SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS": "300"},
         "ok    receipts: QuerySendDetails 300 s after each send, at most 5/s"),
        ({"SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS": "300", "SMS_WORKER_ENABLED": "false"},
         "warn  receipts: SMS_WORKER_ENABLED=false: this replica does not poll"),
    ],
)  # fmt: skip
def test_check_says_how_delivery_receipts_arrive(
    database: Database, fake: FakeAliyun, extra: dict[str, str], line: str
) -> None:
    result = check(live_env(database, fake, **extra))
    assert result.returncode == 0, result.stdout  # a warning, not a failure
    assert result.stdout.splitlines()[-1].startswith(line), result.stdout


def test_check_names_a_wrong_aliyun_secret(database: Database, fake: FakeAliyun) -> None:
    result = check(live_env(database, fake, ALIYUN_ACCESS_KEY_SECRET="wrong"))
    assert result.returncode == 1
    assert "FAIL  aliyun" in result.stdout and "ALIYUN_ACCESS_KEY_SECRET is wrong" in result.stdout


def test_check_notices_pending_migrations(database: Database, fake: FakeAliyun) -> None:
    url = database.url.rsplit("/", 1)[0] + "/template1"  # reachable, never migrated
    result = check(live_env(database, fake, DATABASE_URL=url))
    assert result.returncode == 1 and "FAIL  migrations" in result.stdout and "sms-sidecar migrate" in result.stdout


def test_check_notices_an_unreachable_database(fake: FakeAliyun, database: Database) -> None:
    result = check(live_env(database, fake, DATABASE_URL="postgresql://sms_sidecar@127.0.0.1:1/postgres"))
    assert result.returncode == 1 and "FAIL  database: cannot connect" in result.stdout


def test_check_warns_about_a_too_powerful_role(database: Database, fake: FakeAliyun) -> None:
    result = check(live_env(database, fake, DATABASE_URL=database.url))
    assert result.returncode == 0 and "prefer the sms_sidecar role" in result.stdout


def test_check_warns_that_test_numbers_do_not_work_for_auth(
    database: Database, fake: FakeAliyun, settings: Any
) -> None:
    settings(test_codes={"8613900000007": "135791", "8613900000008": "246802"})
    result = check(live_env(database, fake))
    assert result.returncode == 0, result.stdout  # a warning, not a failure
    (line,) = [line for line in result.stdout.splitlines() if "test numbers" in line]
    assert line.startswith("warn  test numbers: 2 in sms.settings.test_codes")
    assert "GOTRUE_SMS_TEST_OTP" in line
    assert "135791" not in result.stdout and "8613900000007" not in result.stdout


def test_check_reports_configuration_errors_first(database: Database, fake: FakeAliyun) -> None:
    result = check(live_env(database, fake, ALIYUN_SMS_TEMPLATE_CODE=""))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "FAIL  configuration: ALIYUN_SMS_TEMPLATE_CODE is not set (needed by SMS_PROVIDER=aliyun; "
        "use SMS_PROVIDER=console to develop)"
    ]


@pytest.mark.parametrize("command", ["check", "migrate", "serve", "grpc"])
@pytest.mark.parametrize(
    "url",
    ["postgresql//sms:hunter2secret@127.0.0.1:5432/postgres", "postgres:/sms:hunter2secret@h/db",
     "host=127.0.0.1 password=hunter2secret user"],
)  # fmt: skip
def test_a_malformed_database_url_stops_every_command_without_its_password(command: str, url: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "ALIYUN_", "SEND_SMS", "SMS_"))}
    env = {
        **base,
        "DATABASE_URL": url,
        "SMS_PROVIDER": "console",
        "PORT": str(free_port()),
        "GRPC_PORT": str(free_port()),
    }
    result = subprocess.run([sys.executable, "-m", "sidecar", command], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "hunter2secret" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "DATABASE_URL" in lines[0] and "***" in lines[0], output
