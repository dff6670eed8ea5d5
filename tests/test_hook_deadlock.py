"""A hook whose lease met PostgreSQL's deadlock check begins again instead of failing the user.

Two sidecar processes (or a sidecar and an RPC) can need the same phone's and address's limit locks
in opposite orders; PostgreSQL then undoes one statement's work for that event after
deadlock_timeout (sms.hook_begin_many answers it 503 concurrent_request). Here the other side is a
transaction of the test: it holds the phone's lock, waits until the hook's statement waits on it,
then asks for the address's lock, which the hook's statement holds.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg

from sidecar.app import create_app
from sidecar.config import Config
from sidecar.webhook import parse_secrets
from tests.support.builders import fresh_phone, without_send_limits
from tests.support.database import Database
from tests.support.gotrue import GoTrueHookCaller, generate_secret, make_metadata, make_user, otp_login
from tests.support.servers import run_app, sidecar_url

SECRET = generate_secret()
# A limit lock as sms._enforce_send_limits takes it.
LOCK = "insert into sms.limit_locks (key) values (%s) on conflict (key) do update set touched_at = now()"


def wait_until_the_sidecar_waits_on_a_lock(database: Database) -> None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        waiting = database.one(
            "select count(*) from pg_stat_activity where usename = 'sms_sidecar' and wait_event_type = 'Lock'"
        )
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("the hook's statement never waited on the test's lock")


def test_a_hook_undone_by_the_deadlock_check_begins_again_and_is_delivered(database: Database, settings: Any) -> None:
    without_send_limits(settings)
    phone = fresh_phone()
    address = f"203.0.113.{random.randrange(1, 255)}"
    event = otp_login((2, 196, 0), phone=phone, otp="318406", user=make_user(phone=phone),
                      metadata=make_metadata(ip_address=address))  # fmt: skip
    ip_key = database.one("select sms._ip_key(%s::inet)", [address])
    config = Config(database_url=sidecar_url(database), hook_secrets=parse_secrets(SECRET), provider="console",
                    aliyun=None)  # fmt: skip
    answers: list[Any] = []
    with run_app(create_app(config)) as url, psycopg.connect(database.url) as other:
        # The other side takes the phone's lock first (the hook takes the address's, then the phone's).
        other.execute(LOCK, ["phone:" + phone])
        caller = GoTrueHookCaller(url + "/hooks/send-sms", SECRET, version=(2, 196, 0))
        hook = threading.Thread(target=lambda: answers.append(caller.call(event)))
        hook.start()
        wait_until_the_sidecar_waits_on_a_lock(database)
        started = time.monotonic()
        other.execute(LOCK, ["ip:" + ip_key])
        assert time.monotonic() - started > 0.5, "the address's lock was free: no deadlock was set up"
        other.commit()
        hook.join(10)
    (result,) = answers
    assert result.outcome == "success", result
    rows = database.execute("select status, source from sms.outbox where phone = %s", [phone])
    assert rows == [("sent", "auth_hook")]
