"""Every statement the sidecar runs: one method per `sms.*` function it calls, and nothing else does SQL.

Rows become small typed objects here, once (`from_row`, `from_json`). Whatever keeps the database
from answering (down, restarting, pool exhausted, statement timeout) is raised as one
`DatabaseUnavailable`; the SQL core's refusals stay `ApiError`, and any other database error (a bad
value, a missing grant, a schema out of step) stays psycopg's, for the caller to tell apart.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from sidecar.batches import Batcher
from sidecar.db import ApiError, call
from sidecar.errors import DatabaseUnavailable
from sidecar.migrate import bundled
from sidecar.outcomes import CONCURRENT_REQUEST, SendResult
from sidecar.providers.base import Receipt, Sms

__all__ = [
    "GRPC_FUNCTIONS", "GRPC_ROLE", "SIDECAR_FUNCTIONS", "ClaimedMessage", "Duplicate", "Finished", "HookSend",
    "Inspector", "MessageState", "MessageStatus", "QueueStats", "ReceiptDue", "ReceiptStats", "Store", "StoredReceipts",
    "Verification",
    "required_schema_version", "schema_is_current",
]  # fmt: skip

Pool = AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]

# What the sidecar may call, granted by the migrations: `serve` (hook and worker) as sms_sidecar, the
# gRPC drop-in as sms_grpc. `check` verifies the first list; tests/test_grants.py pins both.
SIDECAR_FUNCTIONS = (
    "sms.schema_version()",
    "sms.claim_messages(text, integer, integer)",
    "sms.finish_deliveries(jsonb)",
    "sms.release_messages(text)",
    "sms.hook_begin_many(jsonb, text, integer)",
    "sms.message_state(uuid)",
    "sms.queue_stats()",
    "sms.test_number_count()",
    "sms.record_receipts(jsonb, text)",
    "sms.receipts_due(integer, integer, integer)",
    "sms.receipt_stats(integer, integer)",
)
GRPC_FUNCTIONS = (
    "sms.grpc_send_code(text, text, text)",
    "sms.grpc_verify_code(text, text)",
    "sms.message_state(uuid)",
    "sms.schema_version()",
)
GRPC_ROLE = "sms_grpc"  # holds the gRPC code functions; the login needs: grant sms_grpc to <login>

HOOK_LEASE_SECONDS = 10  # how long a hook request holds its message: its 4-second budget and a margin
HOOK_BATCH = 16  # each begin holds two subtransactions, and PostgreSQL tracks only 64 per transaction cheaply
RESULT_BATCH = 64
RECEIPT_TRIES = 6  # a push that lost a serialization conflict goes again on the winner's rows

# The database did not answer. PoolTimeout and QueryCanceled (statement timeout) are OperationalErrors.
_UNANSWERED = (TimeoutError, OSError, psycopg.OperationalError, psycopg.InterfaceError)


@contextmanager
def _answered() -> Iterator[None]:
    try:
        yield
    except _UNANSWERED as exc:
        raise DatabaseUnavailable(f"the database did not answer ({type(exc).__name__})") from exc


@functools.cache
def required_schema_version() -> str:
    """The newest bundled migration: read once per process, not on every readiness probe."""
    return bundled()[-1].version


def schema_is_current(have: object) -> bool:
    return have is not None and str(have) >= required_schema_version()


class MessageStatus:
    """An outbox message's status (sms.outbox.status), and UNKNOWN for one purged meanwhile."""

    QUEUED, SENDING, SENT, FAILED, UNKNOWN = "queued", "sending", "sent", "failed", "unknown"


# --- rows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outgoing:
    """A message leased to this process for one attempt: what the provider needs."""

    message_id: str
    delivery_id: int
    attempt: int
    phone: str
    code: str
    purpose: str
    sign_name: str | None
    template_code: str | None

    def sms(self) -> Sms:
        return Sms(phone=self.phone, code=self.code, out_id=str(self.delivery_id), sign_name=self.sign_name,
                   template_code=self.template_code)  # fmt: skip


@dataclass(frozen=True)
class HookSend(_Outgoing):
    """sms.hook_begin_many's "send": the hook's event leased to this request."""

    shape: str

    @classmethod
    def from_json(cls, answer: dict[str, Any]) -> HookSend:
        return cls(str(answer["message_id"]), answer["delivery_id"], answer["attempt"], answer["phone"],
                   answer["code"], answer["purpose"], answer["sign_name"], answer["template_code"],
                   answer["shape"])  # fmt: skip


@dataclass(frozen=True)
class ClaimedMessage(_Outgoing):
    """A row of sms.claim_messages."""

    source: str
    created_at: datetime
    needs_reconcile: bool
    ambiguous_delivery_ids: tuple[int, ...]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ClaimedMessage:
        return cls(str(row["message_id"]), row["delivery_id"], row["attempt"], row["phone"], row["code"],
                   row["purpose"], row["sign_name"], row["template_code"], row["source"], row["created_at"],
                   bool(row["needs_reconcile"]), tuple(row["ambiguous_delivery_ids"] or ()))  # fmt: skip


@dataclass(frozen=True)
class MessageState:
    """sms.message_state: where a message is, and how its last attempt ended."""

    status: str
    provider_code: str = ""
    error: str = ""

    @classmethod
    def from_json(cls, state: dict[str, Any] | None) -> MessageState:
        if state is None:  # purged meanwhile: nothing left to say
            return cls(MessageStatus.UNKNOWN)
        return cls(state["status"], state.get("provider_code") or "", state.get("error") or "")


@dataclass(frozen=True)
class Duplicate:
    """sms.hook_begin_many's "duplicate": the event was seen before; its message's state then."""

    message_id: str
    state: MessageState


@dataclass(frozen=True)
class QueueStats:
    queued: int
    oldest_queued_seconds: float

    @classmethod
    def from_json(cls, stats: dict[str, Any]) -> QueueStats:
        return cls(int(stats["queued"]), float(stats["oldest_queued_seconds"]))


@dataclass(frozen=True)
class StoredReceipt:
    """A ledger row a receipt changed: the carrier's verdict and the send-to-receipt latency."""

    delivered: bool
    code: str | None
    latency_ms: int | None


@dataclass(frozen=True)
class StoredReceipts:
    """sms.record_receipts' answer: what changed, how many were repeats (or older), how many not ours."""

    changed: tuple[StoredReceipt, ...]
    repeated: int
    unknown: int

    @classmethod
    def from_json(cls, answer: dict[str, Any]) -> StoredReceipts:
        changed = tuple(StoredReceipt(bool(c["delivered"]), c["code"], c["latency_ms"]) for c in answer["stored"])
        unknown = int(answer["unknown"])
        return cls(changed, int(answer["received"]) - unknown - len(changed), unknown)


@dataclass(frozen=True)
class ReceiptDue:
    """A row of sms.receipts_due: an accepted send whose receipt has not come."""

    delivery_id: int
    phone: str
    biz_id: str
    sent_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ReceiptDue:
        return cls(row["delivery_id"], row["phone"], row["biz_id"], row["sent_at"])


@dataclass(frozen=True)
class ReceiptStats:
    """sms.receipt_stats: of the SMS accepted in its window, how many the carrier delivered within N minutes."""

    sent: int
    undelivered: int
    delivered_within: dict[int, int]  # minutes -> messages

    @classmethod
    def from_json(cls, stats: dict[str, Any]) -> ReceiptStats:
        within = {int(minutes): int(n) for minutes, n in stats["delivered_within"].items()}
        return cls(int(stats["sent"]), int(stats["undelivered"]), within)


@dataclass(frozen=True)
class Verification:
    """sms.grpc_verify_code's answer."""

    valid: bool
    reason: str | None

    @classmethod
    def from_json(cls, answer: Any) -> Verification:
        valid = isinstance(answer, dict) and answer.get("valid") is True
        return cls(valid, None if valid else (answer or {}).get("reason"))


@dataclass(frozen=True)
class Finished:
    """One result for sms.finish_delivery."""

    delivery_id: int
    result: SendResult
    provider: str
    latency_ms: int
    retry_in_seconds: int
    max_attempts: int

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {"delivery_id": self.delivery_id, "outcome": r.outcome.value, "provider": self.provider,
                "provider_code": r.code, "provider_message": r.message, "biz_id": r.biz_id,
                "provider_request_id": r.request_id, "latency_ms": self.latency_ms,
                "retry_in_seconds": self.retry_in_seconds, "max_attempts": self.max_attempts}  # fmt: skip


# --- the gateway -----------------------------------------------------------------------------------


class Store:
    """The sidecar's statements, over its pool; `worker_id` names this process in leases."""

    def __init__(self, pool: Pool, database_url: str, worker_id: str) -> None:
        self._pool = pool
        self._url = database_url
        self._worker_id = worker_id
        self._results = Batcher(pool, "select sms.finish_deliveries(%(items)s)", max_batch=RESULT_BATCH, timeout=5.0)
        self._begins = Batcher(pool, "select sms.hook_begin_many(%(items)s, %(worker)s, %(lease)s)",
                               max_batch=HOOK_BATCH, timeout=3.0,
                               params={"worker": worker_id, "lease": HOOK_LEASE_SECONDS})  # fmt: skip

    async def _one(
        self, query: str, params: dict[str, Any], timeout: float, *, bound: float | None = None, role: str | None = None
    ) -> Any:
        """One statement's first column; with `bound`, the whole call (pool wait included) ends by then."""
        with _answered():
            if bound is None:
                return await call(self._pool, query, params, timeout=timeout, role=role)
            async with asyncio.timeout(bound):  # no extra task per call, unlike wait_for
                return await call(self._pool, query, params, timeout=timeout, role=role)

    async def schema_version(self, timeout: float, bound: float | None = None) -> str | None:
        version = await self._one("select sms.schema_version()", {}, timeout, bound=bound)
        return None if version is None else str(version)

    # The hook.

    async def begin_hook(self, item: dict[str, Any], deadline: float) -> HookSend | Duplicate:
        """sms.hook_begin_many, in a statement shared with the requests that begin meanwhile (sidecar/batches.py),
        answered by `deadline` (time.monotonic()). Raises ApiError when the SQL core refuses the event (a bad
        number, a limit)."""
        for last in (False, True):
            with _answered():
                answer: dict[str, Any] = await self._begins.submit(item, deadline - time.monotonic())
            if answer["action"] != "refused":
                break
            refusal = ApiError.from_parts(answer["error"], answer["meta"])
            # Two processes' shared statements needed the same phone's or address's limit lock in
            # opposite orders, and PostgreSQL's deadlock check undid this event's work (after 1 s):
            # this statement has committed and the other has gone on, so the event can begin now.
            if last or refusal.code != CONCURRENT_REQUEST:
                raise refusal
        if answer["action"] == "duplicate":
            return Duplicate(str(answer["message_id"]), MessageState.from_json(answer))
        return HookSend.from_json(answer)

    async def finish(self, item: Finished, timeout: float) -> str:
        """sms.finish_deliveries, in a statement shared with the results that arrive meanwhile: the
        message's new status once that statement has committed."""
        with _answered():
            return str(await self._results.submit(item.as_json(), timeout))

    async def message_state(self, message_id: str, timeout: float, bound: float | None = None) -> MessageState:
        state = await self._one("select sms.message_state(%(id)s)", {"id": message_id}, timeout, bound=bound)
        return MessageState.from_json(state)

    async def wait_for_state(
        self,
        message_id: str,
        settled: Callable[[MessageState], bool],
        *,
        until: float,
        deadline: float,
        poll: float,
        known: MessageState | None = None,
        max_timeout: float = 5.0,
    ) -> MessageState:
        """Polls sms.message_state every `poll` seconds until `settled` or `until` (time.monotonic());
        each query ends by `deadline`. Starts from `known` when the caller has a state already."""

        async def look() -> MessageState:
            timeout = max(0.05, min(max_timeout, deadline - time.monotonic()))
            return await self.message_state(message_id, timeout, bound=timeout)

        state = known if known is not None else await look()
        while not settled(state) and time.monotonic() + poll < until:
            await asyncio.sleep(poll)
            state = await look()
        return state

    # The delivery worker.

    async def _rows(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every row of one statement (a set-returning function)."""
        with _answered():
            async with self._pool.connection(timeout=5) as conn:
                return await (await conn.execute(query, params)).fetchall()

    async def claim_messages(self, limit: int, lease_seconds: int) -> list[ClaimedMessage]:
        rows = await self._rows("select * from sms.claim_messages(%(worker)s, %(limit)s, %(lease)s)",
                                {"worker": self._worker_id, "limit": limit, "lease": lease_seconds})  # fmt: skip
        return [ClaimedMessage.from_row(row) for row in rows]

    async def release_messages(self, timeout: float) -> int:
        """Hands this process's claimed, unsent messages back to the queue: how many."""
        released = await self._one("select sms.release_messages(%(w)s)", {"w": self._worker_id}, timeout)
        return int(released or 0)

    async def queue_stats(self, timeout: float) -> QueueStats:
        return QueueStats.from_json(await self._one("select sms.queue_stats()", {}, timeout))

    async def outbox_notifications(self) -> AsyncIterator[None]:
        """A LISTEN sms_outbox connection of its own: yields once listening, then once per NOTIFY."""
        with _answered():
            async with await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, application_name="sms-sidecar-listen"
            ) as conn:
                await conn.execute("listen sms_outbox")
                yield
                async for _ in conn.notifies():
                    yield

    # Delivery receipts.

    async def record_receipts(self, receipts: list[Receipt], source: str, timeout: float) -> StoredReceipts:
        """sms.record_receipts: all of a push in one statement. Two pushes changing the same rows under
        REPEATABLE READ or SERIALIZABLE (a server default) conflict; the loser goes again on the winner's
        rows, which the receipts' order makes idempotent."""
        params = {"receipts": Jsonb([r.as_json() for r in receipts]), "source": source}
        tries = 0
        while True:
            try:
                answer = await self._one("select sms.record_receipts(%(receipts)s, %(source)s)", params, timeout)
                return StoredReceipts.from_json(answer)
            except DatabaseUnavailable as exc:
                tries += 1
                # SQLSTATE class 40: a serialization failure or a deadlock, undone; nothing was stored.
                conflict = isinstance(exc.__cause__, psycopg.Error) and str(exc.__cause__.sqlstate).startswith("40")
                if not conflict or tries == RECEIPT_TRIES:
                    raise
                await asyncio.sleep(random.uniform(0, 0.05 * 2**tries))

    async def receipts_due(self, after_seconds: int, limit: int) -> list[ReceiptDue]:
        rows = await self._rows("select * from sms.receipts_due(%(after)s, %(limit)s)",
                                {"after": after_seconds, "limit": limit})  # fmt: skip
        return [ReceiptDue.from_row(row) for row in rows]

    async def receipt_stats(self, timeout: float) -> ReceiptStats:
        return ReceiptStats.from_json(await self._one("select sms.receipt_stats()", {}, timeout))

    # The gRPC drop-in, as sms_grpc.

    async def grpc_send_code(
        self, phone: str, sign_name: str | None, template_code: str | None, timeout: float
    ) -> str | None:
        """Issues a code: its message id, None when there is nothing to deliver (a test number's)."""
        issued = await self._one("select sms.grpc_send_code(%(phone)s, %(sign)s, %(template)s)",
                                 {"phone": phone, "sign": sign_name, "template": template_code}, timeout,
                                 bound=timeout, role=GRPC_ROLE)  # fmt: skip
        message_id = issued.get("message_id")
        return None if message_id is None else str(message_id)

    async def grpc_verify_code(self, phone: str, code: str, timeout: float) -> Verification:
        answer = await self._one("select sms.grpc_verify_code(%(phone)s, %(code)s)", {"phone": phone, "code": code},
                                 timeout, bound=timeout, role=GRPC_ROLE)  # fmt: skip
        return Verification.from_json(answer)


class Inspector:
    """What `sms-sidecar check` asks of a database, over one plain connection of its own."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def _value(self, query: str, params: list[Any] | None = None) -> Any:
        row = self._conn.execute(query, params).fetchone()
        return row[0] if row else None

    def schema_version(self) -> str | None:
        """None when sms.schema_version() does not exist yet (nothing migrated)."""
        if not self._value("select to_regprocedure('sms.schema_version()') is not null"):
            return None
        version = self._value("select sms.schema_version()")
        return None if version is None else str(version)

    def missing_grants(self) -> list[str]:
        return [fn for fn in SIDECAR_FUNCTIONS
                if not self._value("select has_function_privilege(current_user, %s, 'execute')", [fn])]  # fmt: skip

    def bypasses_rls(self) -> bool:
        return bool(self._value("select rolsuper or rolbypassrls from pg_roles where rolname = current_user"))

    def test_number_count(self) -> int:
        return int(self._value("select sms.test_number_count()") or 0)
