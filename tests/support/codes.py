"""The verification-code RPCs as a caller sees them, and the code the outbox holds for a request."""

from __future__ import annotations

from tests.support.database import Database
from tests.support.postgrest import Caller, PostgREST


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
