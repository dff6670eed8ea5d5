"""sms.send_sms_hook called exactly as GoTrue's pg-functions hook calls it: as supabase_auth_admin,
inside the auth request's transaction, with a 2 s statement timeout and GoTrue's payload bytes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sidecar.app import create_app
from sidecar.config import Config, WorkerConfig
from sidecar.providers.aliyun import AliyunProvider
from tests.support.aliyun import aliyun_config
from tests.support.builders import fresh_phone
from tests.support.database import Database, all_sent, auth_limits_hit, call_hook, drain_queue
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import go_json, make_metadata, mfa_challenge, otp_login, phone_change
from tests.support.servers import run_app, sidecar_url, wait_until


@pytest.fixture(autouse=True)
def _quiet(database: Database) -> None:
    drain_queue(database)


@pytest.mark.parametrize("version", [(2, 150, 0), (2, 185, 0), (2, 196, 0)], ids=str)
def test_each_payload_shape_is_queued_for_the_worker(database: Database, version: Any) -> None:
    phone = fresh_phone()
    assert call_hook(database, go_json(otp_login(version, phone=phone, otp="314159"))) == {}
    row = database.one("select to_jsonb(o) from sms.outbox as o where o.phone = %s", [phone])
    assert (row["source"], row["status"], row["code"], row["purpose"]) == ("pg_hook", "queued", "314159", "default")


def test_the_flat_shape_of_the_oldest_gotrue(database: Database) -> None:
    phone = fresh_phone()
    assert call_hook(database, json.dumps({"user_id": "u", "phone": phone, "otp": "123456"}).encode()) == {}
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 1


def test_phone_change_and_mfa_queue_the_right_number_and_purpose(database: Database) -> None:
    old, new, factor = fresh_phone(), fresh_phone(), fresh_phone()
    assert call_hook(database, go_json(phone_change((2, 196, 0), old_phone=old, new_phone=new))) == {}
    assert call_hook(database, go_json(mfa_challenge((2, 196, 0), factor_phone=factor, user_phone=""))) == {}
    queued = dict(database.execute("select phone, purpose from sms.outbox where phone = any(%s)", [[old, new, factor]]))
    assert queued == {new: "default", factor: "mfa"}


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"user": {"phone": ""}, "sms": {"otp": "123456", "phone": "12025550123"}}, 400),
        ({"user": {"phone": ""}, "sms": {"otp": "123456", "phone": "not-a-number"}}, 400),
        ({"user": {"phone": ""}, "sms": {"phone": "8613012345678"}}, 400),
        ({"unexpected": True}, 400),
    ],
    ids=["not-allowed", "invalid", "no-otp", "unknown-shape"],
)
def test_refusals_are_error_objects_not_exceptions(database: Database, payload: Any, status: int) -> None:
    result = call_hook(database, json.dumps(payload).encode())
    assert result["error"]["http_code"] == status and result["error"]["message"]


def test_limits_answer_429_with_a_message(database: Database) -> None:
    phone = fresh_phone()
    assert call_hook(database, go_json(otp_login((2, 196, 0), phone=phone))) == {}
    result = call_hook(database, go_json(otp_login((2, 196, 0), phone=phone, otp="271828")))
    assert result["error"]["http_code"] == 429 and "60" in result["error"]["message"]
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 1


def test_hourly_limit_per_phone_applies_to_the_pg_hook(database: Database, settings: Any) -> None:
    settings(resend_cooldown_seconds=None)  # hourly_limit_per_phone at its default, 5
    phone = fresh_phone()
    for n in range(5):
        assert call_hook(database, go_json(otp_login((2, 196, 0), phone=phone, otp=f"20000{n}"))) == {}
    database.execute(
        "update sms.outbox set created_at = created_at - interval '50 minutes' where id = "
        "(select id from sms.outbox where phone = %s order by created_at limit 1)",
        [phone],
    )
    result = call_hook(database, go_json(otp_login((2, 196, 0), phone=phone, otp="200005")))
    assert result["error"]["http_code"] == 429
    wait = re.search(r"in (\d+) seconds", result["error"]["message"])
    assert wait and 595 <= int(wait.group(1)) <= 600, result
    assert "hourly_limit_per_phone" in auth_limits_hit(database, phone)[0]
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 5


def test_per_ip_limit_uses_metadata_ip_address(database: Database, settings: Any) -> None:
    settings(hourly_limit_per_ip=1)
    ip = "203.0.113.99"
    first = otp_login((2, 196, 0), phone=fresh_phone(), metadata=make_metadata(ip_address=ip))
    second = otp_login((2, 196, 0), phone=fresh_phone(), metadata=make_metadata(ip_address=ip))
    assert call_hook(database, go_json(first)) == {}
    assert call_hook(database, go_json(second))["error"]["http_code"] == 429


def test_a_repeated_event_is_queued_once(database: Database) -> None:
    phone = fresh_phone()
    body = go_json(otp_login((2, 196, 0), phone=phone))
    assert call_hook(database, body) == {} and call_hook(database, body) == {}
    assert database.one("select count(*) from sms.outbox where phone = %s", [phone]) == 1


def test_test_numbers_are_not_queued(database: Database, settings: Any) -> None:
    phone = fresh_phone()
    settings(test_codes={phone: "000000"})
    assert call_hook(database, go_json(otp_login((2, 196, 0), phone=phone))) == {}
    assert database.one("select status from sms.outbox where phone = %s", [phone]) == "sent"


def test_only_supabase_auth_admin_may_call_it(database: Database) -> None:
    for role in ("anon", "authenticated", "service_role", "sms_sidecar"):
        assert not database.one("select has_function_privilege(%s, 'sms.send_sms_hook(jsonb)', 'execute')", [role])
    assert database.one("select has_function_privilege('supabase_auth_admin', 'sms.send_sms_hook(jsonb)', 'execute')")


def test_the_worker_delivers_what_the_pg_hook_queued(database: Database, fake: FakeAliyun) -> None:
    aliyun = aliyun_config(fake.endpoint, sign_name="签名", template_code="SMS_1")
    config = Config(database_url=sidecar_url(database), hook_secrets=(), provider="aliyun", aliyun=aliyun,
                    worker=WorkerConfig(sweep_seconds=0.2))  # fmt: skip
    phone = fresh_phone()
    with run_app(create_app(config, AliyunProvider(aliyun))):
        assert call_hook(database, go_json(otp_login((2, 196, 0), phone=phone, otp="161803"))) == {}
        wait_until(lambda: all_sent(database, [phone]), 10, "delivery")
    (sent,) = fake.sends
    assert (sent.phone_numbers, sent.template_param) == (phone[2:], {"code": "161803"})
