"""The verification-code RPCs as a caller sees them, the code the outbox holds for a request, and codes
a running sidecar has delivered to the fake Aliyun."""

from __future__ import annotations

from tests.support.builders import fresh_phone
from tests.support.database import Database, all_sent
from tests.support.fake_aliyun import FakeAliyun, Send
from tests.support.postgrest import SERVICE, Caller, PostgREST
from tests.support.servers import wait_until


def request(api: PostgREST, phone: str, caller: Caller, purpose: str | None = None) -> dict[str, object]:
    args = {"phone": phone} if purpose is None else {"phone": phone, "purpose": purpose}
    response = api.rpc("request_phone_code", args, caller)
    assert response.status == 200, response.body
    body: dict[str, object] = response.body
    return body


def request_id(api: PostgREST, phone: str, caller: Caller, purpose: str | None = None) -> str:
    return str(request(api, phone, caller, purpose)["request_id"])


def verify(api: PostgREST, phone: str, code: str, caller: Caller, purpose: str = "default") -> dict[str, object]:
    response = api.rpc("verify_phone_code", {"phone": phone, "code": code, "purpose": purpose}, caller)
    assert response.status == 200, response.body
    body: dict[str, object] = response.body
    return body


def queued_code(db: Database, request_id: object) -> str:
    code: str = db.one("select o.code from sms.outbox as o where o.code_id = %s", [request_id])
    return code


def wrong(code: str, delta: int = 1) -> str:
    """Another code of the same length."""
    return f"{(int(code) + delta) % 10 ** len(code):0{len(code)}d}"


def delivered_codes(
    api: PostgREST, database: Database, fake: FakeAliyun, count: int, caller: Caller = SERVICE
) -> list[tuple[str, Send]]:
    """`count` codes requested through the API, to new numbers, and sent by the sidecar running meanwhile:
    each request id with the send the fake recorded, in order."""
    phones = [fresh_phone() for _ in range(count)]
    ids = [request_id(api, phone, caller) for phone in phones]
    wait_until(lambda: all_sent(database, phones), 10 + count / 10, f"{count} sends")
    sends = {"86" + s.phone_numbers: s for s in fake.sends}
    return [(rid, sends[phone]) for rid, phone in zip(ids, phones, strict=True)]
