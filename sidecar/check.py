"""`sms-sidecar check`: is this deployment ready to go live? One line per check, with the fix."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from sidecar.config import Config, ConfigError
from sidecar.store import Inspector, required_schema_version, schema_is_current

__all__ = ["run_checks"]


@dataclass
class Result:
    ok: bool
    name: str
    detail: str
    warn: bool = False  # ok, but worth knowing before going live


def run_checks(env: Mapping[str, str] | None = None, out: Callable[[str], None] = print) -> int:
    env = os.environ if env is None else env
    results: list[Result] = []

    def report(result: Result) -> None:
        results.append(result)
        out(f"{('warn' if result.warn else 'ok  ') if result.ok else 'FAIL'}  {result.name}: {result.detail}")

    try:
        config = Config.from_env(env)
    except ConfigError as exc:
        report(Result(False, "configuration", str(exc)))
        return 1
    report(Result(True, "configuration", f"provider {config.provider}, {len(config.hook_secrets)} hook secret(s)"))
    if not config.hook_secrets:
        report(Result(False, "hook secret", "SEND_SMS_HOOK_SECRETS is not set: the HTTP hook would refuse every "
                      "request (set it to GoTrue's GOTRUE_HOOK_SEND_SMS_SECRETS value)"))  # fmt: skip

    for result in _database_checks(config.database_url):
        report(result)
    report(_provider_check(config))
    report(_receipts_check(config))
    return 0 if all(r.ok for r in results) else 1


def _database_checks(url: str) -> list[Result]:
    try:
        conn = psycopg.connect(url, connect_timeout=5, autocommit=True)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [Result(False, "database", f"cannot connect ({first}); check DATABASE_URL, the password and that "
                       "sms_sidecar may log in: alter role sms_sidecar with login password '...'")]  # fmt: skip
    with conn:
        results = [Result(True, "database", f"connected as {conn.info.user}")]
        database = Inspector(conn)
        needed = required_schema_version()
        have = database.schema_version()
        if not schema_is_current(have):
            results.append(Result(False, "migrations", f"database at {have or 'nothing'}, sidecar needs {needed}: "
                                  "run `sms-sidecar migrate` with the postgres role's DATABASE_URL"))  # fmt: skip
            return results
        results.append(Result(True, "migrations", f"schema version {have}"))
        missing = database.missing_grants()
        if missing:
            results.append(Result(False, "grants", f"{conn.info.user} cannot execute {', '.join(missing)}: connect "
                                  "as sms_sidecar (granted by the migrations)"))  # fmt: skip
        else:
            detail = "can claim, send and record messages"
            if database.bypasses_rls():
                detail += f" (but {conn.info.user} is a superuser or bypasses RLS: prefer the sms_sidecar role)"
            results.append(Result(True, "grants", detail))
            results.append(_test_numbers(database.test_number_count()))
        return results


def _test_numbers(count: int) -> Result:
    if not count:
        return Result(True, "test numbers", "none in sms.settings.test_codes")
    # For Auth hook events GoTrue generates the OTP: the hook sends nothing to a test number, and
    # nobody learns the code GoTrue expects.
    return Result(True, "test numbers", f"{count} in sms.settings.test_codes apply to supabase.rpc and gRPC "
                  "codes only: a Supabase Auth hook event for such a number is answered as sent but nothing is "
                  "texted and GoTrue's OTP stays unknown; for Auth use GOTRUE_SMS_TEST_OTP (e.g. "
                  "8613800000000:123456) in the auth service instead", warn=True)  # fmt: skip


def _provider_check(config: Config) -> Result:
    if config.provider == "console":
        return Result(True, "provider", "console: messages are printed, nothing is sent")
    from sidecar.providers.aliyun import AliyunProvider

    assert config.aliyun is not None
    provider = AliyunProvider(config.aliyun)

    async def probe() -> None:
        try:
            # QuerySendDetails is read-only and needs the same credentials and RAM permission family as SendSms.
            await provider.find_sent("8613800000000", ["sms-sidecar-check"], datetime.now(UTC), 10.0)
        finally:
            await provider.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        code = getattr(exc, "code", None) or type(exc).__name__
        hint = {
            "InvalidAccessKeyId.NotFound": "ALIYUN_ACCESS_KEY_ID does not exist",
            "SignatureDoesNotMatch": "ALIYUN_ACCESS_KEY_SECRET is wrong",
            "Forbidden.RAM": "give the RAM user the AliyunDysmsFullAccess policy (or dysms:SendSms and "
            "dysms:QuerySendDetails)",
        }.get(str(code), f"{str(exc).strip()[:200]}")
        return Result(False, "aliyun", f"{config.aliyun.endpoint}: {code}: {hint}")
    return Result(True, "aliyun", f"credentials accepted by {config.aliyun.endpoint} (QuerySendDetails)")


def _receipts_check(config: Config) -> Result:
    """How delivery receipts arrive (README, "Delivery receipts"); the token itself is never shown."""
    ways = []
    if config.report_token is not None:
        ways.append("Aliyun's push to POST /aliyun/sms-report/<ALIYUN_SMS_REPORT_TOKEN> (enter its public URL in "
                    "the SMS console: 通用设置 → 发送状态回执 → HTTP 批量推送)")  # fmt: skip
    polling = config.worker.receipt_poll_after_seconds
    if polling:
        ways.append(f"QuerySendDetails {polling} s after each send, at most {config.worker.receipt_poll_qps:g}/s")
    if not ways:
        return Result(True, "receipts", "off: phone_code_status reports delivered null for every code; set "
                      "ALIYUN_SMS_REPORT_TOKEN (Aliyun's push) or SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS (polling)",
                      warn=True)  # fmt: skip
    if polling and config.provider == "console":
        return Result(True, "receipts", "SMS_PROVIDER=console has no carrier: nothing to poll", warn=True)
    if polling and not config.worker.enabled:
        return Result(True, "receipts", "SMS_WORKER_ENABLED=false: this replica does not poll (another must)",
                      warn=True)  # fmt: skip
    return Result(True, "receipts", "; ".join(ways))
