"""What the hostile-input tests (tests/test_hostile/) share: the sidecar app under attack, in process and
under uvicorn, GoTrue-style signing, and what every answer to an attacker must look like."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

import anyio.from_thread
import httpx
from hypothesis import HealthCheck, Phase, strategies as st

from sidecar.app import create_app
from sidecar.config import Config, WorkerConfig
from sidecar.providers.aliyun import AliyunProvider
from sidecar.webhook import parse_secrets
from tests.support.aliyun import INTL_SIGN, INTL_TEMPLATE, aliyun_config
from tests.support.database import Database
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import (
    GoTrueHookCaller,
    HookResult,
    generate_secret,
    signed_headers,
)
from tests.support.postgrest import Caller, PostgREST, Response
from tests.support.servers import sidecar_url

SECRET = generate_secret()  # the only secret the sidecars here are configured with
RETIRED = generate_secret()  # rotated out: GoTrue may still hold it, the sidecar no longer does
HOOK = "/hooks/send-sms"
NEW = (2, 196, 0)  # sends metadata, reads error objects
OLD = (2, 185, 0)  # no metadata: failures must be non-2xx statuses

# Everything that may answer a hostile request while the database and the provider are healthy:
# 200 ({} or an error object), 400, 401, 403 (a rate limit for old GoTrue), 413, and 500 as the
# deliberate answer for an OTP Aliyun cannot take. 502/503/504 mean an outage; none happens here.
FUZZ_STATUSES = {200, 400, 401, 403, 413, 500}
ERROR_CODES = {400, 401, 413, 429, 500}

FUZZ = dict(
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],  # no "explain": it costs seconds
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

SQL_METACHARACTERS = [
    "'",
    "''",
    '"',
    "\\",
    "%",
    "_",
    "$$",
    "$x$",
    ";",
    "--",
    "/*",
    "'; drop table sms.codes; --",
    "' or '1'='1",
    "') or true --",
    "'||(select code from sms.outbox limit 1)||'",
    "1); select pg_sleep(5); --",
    "E'\\x41'",
    "\\N",
    "null",
    "NULL",
    "{}",
    "[]",
    "%s",
    "%(phone)s",
    "{0}",
]
FULLWIDTH = str.maketrans("0123456789+", "０１２３４５６７８９＋")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
PURPOSE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


def sidecar_app(database: Database, fake: FakeAliyun, secrets: str = SECRET) -> Any:
    aliyun = aliyun_config(fake.endpoint, intl_sign_name=INTL_SIGN, intl_template_code=INTL_TEMPLATE)
    # No delivery worker: the hook sends by itself, and the SQL tests here queue messages nobody must send.
    config = Config(database_url=sidecar_url(database), hook_secrets=parse_secrets(secrets), provider="aliyun",
                    aliyun=aliyun, worker=WorkerConfig(enabled=False))  # fmt: skip
    return create_app(config, AliyunProvider(aliyun))


class InProcess:
    """The app with its lifespan running in an event loop of its own thread; requests go through ASGI,
    so header bytes reach the app exactly as given (no HTTP parser in between)."""

    def __init__(self, app: Any, portal: anyio.from_thread.BlockingPortal) -> None:
        self.app = app
        self.portal = portal
        # raise_app_exceptions: a crash inside the app fails the test with its traceback.
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar.test")

    def post(self, body: Any, headers: Any, path: str = HOOK) -> httpx.Response:
        async def go() -> httpx.Response:
            return await self.client.post(path, content=body, headers=headers)

        return self.portal.call(go)

    def gotrue(self, payload: Any, version: tuple[int, int, int] = NEW, secrets: str = SECRET) -> HookResult:
        caller = GoTrueHookCaller.for_app(self.app, HOOK, secrets, version=version)
        return self.portal.call(caller.call_async, payload)


def hmac_b64(key: bytes, msg_id: bytes, timestamp: bytes, body: bytes) -> str:
    """A signature over any bytes, for forged headers GoTrue never sends (see test_hook_headers)."""
    return base64.b64encode(hmac.new(key, msg_id + b"." + timestamp + b"." + body, hashlib.sha256).digest()).decode()


def signed(
    body: bytes, secret: str = SECRET, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    return {"content-type": "application/json", **signed_headers(body, secret, msg_id, timestamp)}


def answer_kind(response: httpx.Response) -> str:
    """'success' for 200 {}, else 'error' after checking the body is the hook's JSON error object."""
    assert response.status_code in FUZZ_STATUSES, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    if response.status_code == 200 and body == {}:
        return "success"
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"http_code", "message"}, body
    assert isinstance(error["http_code"], int) and error["http_code"] in ERROR_CODES, body
    assert isinstance(error["message"], str) and error["message"], body
    if response.status_code != 200:  # old GoTrue gets the status itself; 403 stands for 429 there
        assert {403: 429}.get(response.status_code, response.status_code) == error["http_code"], body
    return "error"


def digits(text: str) -> str:
    return re.sub(r"[^0-9]", "", text)


def assert_plausible_send(sent: Any, body: bytes) -> None:
    """An SMS that went out: to a mainland number (the default allow-list) and with a code, both from the body."""
    text = body.decode(json.detect_encoding(body), "replace")  # json.loads reads UTF-16 and UTF-32 too
    assert re.fullmatch(r"1[3-9][0-9]{9}", sent.phone_numbers) and sent.template_code == "SMS_154950909", sent
    assert sent.phone_numbers[-8:] in digits(text), (sent, text)
    code = sent.template_param["code"]
    assert re.fullmatch(r"[0-9]{4,6}", code) and code in text, (sent, text)


def ask(api: PostgREST, phone: str, caller: Caller, purpose: str = "default") -> Response:
    return api.rpc("request_phone_code", {"phone": phone, "purpose": purpose}, caller)


def limits_hit(response: Response) -> list[str]:
    assert response.status == 429, response.body
    assert response.body["code"] == "over_sms_send_rate_limit"
    return list(json.loads(response.body["details"])["limits"])


# A mainland mobile number; Hypothesis picks the digits, so runs repeat.
mainland = st.integers(0, 10**9 - 1).map(lambda n: f"86139{n:09d}"[:13])
