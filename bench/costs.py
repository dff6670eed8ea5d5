"""Where the CPU of a hook request and of an outbox delivery goes: the numbers behind "Findings".

    .venv/bin/python bench/costs.py [--quick]

Not a pass/fail benchmark. It measures, in isolation:

A. client-side CPU per operation (CPU time of the calling thread, so the in-process fake Aliyun's
   threads are not counted): SendSms through the sidecar's provider (AliyunProvider.send over its one
   aiohttp session, in the event loop `serve` runs; one at a time, and many gathered at once), the
   webhook signature check, JSON parsing/encoding of an event, one JSON log line, the Prometheus
   updates, one psycopg pool round trip, and the hook's two SQL calls;
B. server-side time per SQL call from pg_stat_user_functions (track_functions = all): the hook's
   hook_begin_many + finish_deliveries, verify_phone_code, request_phone_code, the worker's claim_messages
   and queue_stats, with the inner functions' own (self) time;
C. claim_messages and queue_stats as sms.outbox grows (delivered rows stay for the 24-hour limits),
   with and without a partial index on pending rows' expires_at;
D. a fresh process's provider: start() (imports the SDK, opens the session), then its first sends
   (the first one connects).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import _common as c
import psycopg
from psycopg.types.json import Jsonb

from sidecar.db import call, create_pool
from sidecar.logs import JsonFormatter
from sidecar.metrics import Metrics
from sidecar.outcomes import SendResult
from sidecar.providers.base import Sms
from sidecar.webhook import WebhookVerifier, parse_secrets
from tests.support.gotrue import go_json, make_metadata, make_user, otp_login, sign

CONCURRENT = 32  # sends gathered at once, each on a connection of the session's pool


def per_op(fn: Callable[[], Any], n: int, batches: int = 3, clock: Callable[[], float] = time.thread_time) -> float:
    """Median over batches of CPU microseconds per call of fn."""
    for _ in range(max(3, n // 20)):
        fn()
    results = []
    for _ in range(batches):
        t0 = clock()
        for _ in range(n):
            fn()
        results.append((clock() - t0) / n * 1e6)
    return statistics.median(results)


def event() -> tuple[dict[str, Any], bytes, dict[str, str]]:
    phone = c.next_phone()
    payload = otp_login(
        c.GOTRUE_VERSION,
        phone=phone,
        otp="123456",
        user=make_user(phone=phone),
        metadata=make_metadata(ip_address="198.18.0.1"),
    )
    body = go_json(payload)
    msg_id, ts = str(uuid.uuid4()), int(time.time())
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign([c.HOOK_SECRET], msg_id, ts, body),
    }
    return payload, body, headers


def provider_rows(loop: asyncio.AbstractEventLoop, fake: c.FakeAliyun, n: int) -> list[list[str]]:
    """CPU per SendSms of the sidecar's provider over one long-lived session, started once."""
    provider = c.aliyun_provider(fake.endpoint)
    loop.run_until_complete(provider.start())

    def one() -> None:
        result = loop.run_until_complete(provider.send(Sms(c.next_phone(), "123456", "1"), c.SEND_TIMEOUT))
        assert result.accepted, result

    async def batch() -> list[SendResult]:
        return await asyncio.gather(
            *(provider.send(Sms(c.next_phone(), "123456", "1"), c.SEND_TIMEOUT) for _ in range(CONCURRENT))
        )

    def gathered() -> None:
        results = loop.run_until_complete(batch())
        assert all(r.accepted for r in results), [r for r in results if not r.accepted][:3]

    before = len(fake.sends)
    batches = max(1, n // CONCURRENT)
    kind = type(loop).__module__.split(".")[0]
    concurrent = per_op(gathered, batches) / CONCURRENT
    rows = [
        [f"SendSms, AliyunProvider.send, one at a time ({kind} loop)", f"{per_op(one, n):.0f}"],
        [f"SendSms, AliyunProvider.send, {CONCURRENT} gathered at once (per send)", f"{concurrent:.0f}"],
    ]
    fake_cpu = per_op(one, n, clock=time.process_time) - per_op(one, n)
    rows.append(["  the fake's own CPU per SendSms (for reference; other threads)", f"{fake_cpu:.0f}"])
    loop.run_until_complete(provider.close())
    assert not fake.rejected, fake.rejected[:3]
    c.log(f"fake accepted {len(fake.sends) - before} sends, rejected none")
    return rows


def section_a(db: c.BenchDatabase, fake: c.FakeAliyun, n: int) -> list[list[str]]:
    loop = c.event_loop()
    rows = provider_rows(loop, fake, n)

    payload, body, headers = event()
    verifier = WebhookVerifier(parse_secrets(c.HOOK_SECRET))
    rows.append(
        [
            "webhook signature check (WebhookVerifier.verify)",
            f"{per_op(lambda: verifier.verify(headers, body), n * 20):.0f}",
        ]
    )

    def parse() -> None:
        ev = json.loads(body)
        json.dumps(ev)  # what psycopg's Jsonb dumper does with it
        __import__("hashlib").sha256(body).hexdigest()

    rows.append(["event JSON parse + re-encode for Jsonb + sha256", f"{per_op(parse, n * 20):.0f}"])

    with tempfile.NamedTemporaryFile("w", suffix=".log") as sink:
        logger = logging.Logger("bench.cost")
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        fields = {"phone": "+86*******1234", "delivery_id": 1, "shape": "metadata", "purpose": "default",
                  "provider": "aliyun", "provider_code": "OK", "biz_id": "123^0", "request_id": str(uuid.uuid4()),
                  "latency_ms": 3}  # fmt: skip
        rows.append(
            [
                "one JSON log line (JsonFormatter + StreamHandler)",
                f"{per_op(lambda: logger.info('hook SMS accepted', extra=fields), n * 20):.0f}",
            ]
        )

    m = Metrics()

    def metrics() -> None:
        m.hook_requests.labels("sent").inc()
        m.hook_latency.observe(0.01)
        m.provider_latency.labels("aliyun").observe(0.003)
        m.provider_results.labels("aliyun", "OK").inc()

    rows.append(["Prometheus updates of one hook request", f"{per_op(metrics, n * 20):.0f}"])

    async def db_ops() -> tuple[float, float]:
        pool = create_pool(db.sidecar_url)
        await pool.open(wait=True)

        async def timed(fn: Callable[[], Any], count: int) -> float:
            for _ in range(10):
                await fn()
            out = []
            for _ in range(3):
                t0 = time.thread_time()
                for _ in range(count):
                    await fn()
                out.append((time.thread_time() - t0) / count * 1e6)
            return statistics.median(out)

        select1 = await timed(lambda: call(pool, "select 1", {}, timeout=5), n * 4)

        async def hook_calls() -> None:
            ev, raw, _ = event()
            (begin,) = await call(pool, "select sms.hook_begin_many(%(items)s, 'bench', 10)",
                                  {"items": Jsonb([hook_item(ev, raw)])}, timeout=5)  # fmt: skip
            await call(pool, "select sms.finish_deliveries(%(items)s)",
                       {"items": Jsonb([accepted(begin["delivery_id"])])}, timeout=5)  # fmt: skip

        hook = await timed(hook_calls, n)
        await pool.close()
        return select1, hook

    select1, hook = loop.run_until_complete(db_ops())
    loop.close()
    rows.append(["psycopg pool round trip (sidecar.db.call 'select 1')", f"{select1:.0f}"])
    rows.append(["the hook's SQL: hook_begin_many + finish_deliveries, client side (2 calls)", f"{hook:.0f}"])
    return rows


def section_b(db: c.BenchDatabase, n: int) -> tuple[list[list[str]], dict[str, list[list[str]]]]:
    """Server-side time per call and the inner functions' self time, one workload at a time."""
    claims = "json_build_object('role', 'authenticated', 'sub', md5('u' || g)::uuid)::text"
    workloads = {
        "verify_phone_code (PostgREST-shaped, 1 in 4 right)": (
            "do $$ begin for g in 1..%(n)s loop"
            " perform set_config('request.jwt.claims', " + claims + ", true);"
            " perform public.verify_phone_code('+8613' || lpad(g::text, 9, '0'),"
            "   case when g %% 4 = 0 then lpad((g * 7919 %% 1000000)::text, 6, '0') else '000000' end);"
            " end loop; end $$"
        ),
        "request_phone_code (PostgREST-shaped)": (
            "do $$ begin for g in 1..%(n)s loop"
            " perform set_config('request.jwt.claims', " + claims + ", true);"
            " perform set_config('request.headers', '{\"x-real-ip\": \"198.18.0.1\"}', true);"
            " perform public.request_phone_code('+8616' || lpad(g::text, 9, '0'));"
            " end loop; end $$"
        ),
    }
    db.execute(
        "insert into sms.codes (id, phone, purpose, owner, user_id, code_hash, expires_at)"
        " select s.id, '8613' || lpad(s.g::text, 9, '0'), 'default', 'user:' || s.uid, s.uid,"
        " sms._hash_code(s.id, lpad((s.g * 7919 %% 1000000)::text, 6, '0')), now() + interval '1 day'"
        " from (select g, gen_random_uuid() as id, md5('u' || g)::uuid as uid from generate_series(1, %s) as g) as s",
        [n],
        superuser=True,
    )
    summary: list[list[str]] = []
    detail: dict[str, list[list[str]]] = {}
    for name, sql in workloads.items():
        db.execute("select pg_stat_reset()", superuser=True)
        with psycopg.connect(db.authenticator_url) as conn:
            conn.execute("set local role authenticated")
            t0 = time.monotonic()
            conn.execute(sql.replace("%(n)s", str(n)).replace("%%", "%"))
            wall = time.monotonic() - t0
            conn.commit()
        time.sleep(0.6)  # the statistics collector
        rows = function_stats(db)
        summary.append([name, f"{wall / n * 1e6:.0f}"])
        detail[name] = rows
    return summary, detail


def function_stats(db: c.BenchDatabase) -> list[list[str]]:
    return [
        [f"{schema}.{fn}", str(calls), f"{total / calls * 1000:.0f}", f"{self_ / calls * 1000:.0f}"]
        for schema, fn, calls, total, self_ in db.execute(
            "select schemaname, funcname, calls, total_time, self_time from pg_stat_user_functions"
            " where calls > 0 order by self_time desc limit 12",
            superuser=True,
        )
    ]


def hook_item(ev: Any, raw: bytes) -> dict[str, Any]:
    """One event for sms.hook_begin_many, as the sidecar hands it over."""
    return {"event": ev, "body_sha256": hashlib.sha256(raw).hexdigest()}


def accepted(delivery_id: int) -> dict[str, Any]:
    """An accepted result for sms.finish_deliveries."""
    return {"delivery_id": delivery_id, "outcome": "accepted", "provider": "aliyun", "provider_code": "OK",
            "provider_message": "OK", "biz_id": "1^0", "provider_request_id": "r", "latency_ms": 3,
            "retry_in_seconds": 0, "max_attempts": 1}  # fmt: skip


def section_b_hook(db: c.BenchDatabase, n: int) -> list[list[str]]:
    """The hook's SQL as the sidecar role, n requests, per-function times."""
    db.execute("select pg_stat_reset()", superuser=True)
    with psycopg.connect(db.sidecar_url, autocommit=True) as conn:
        for _ in range(n):
            ev, raw, _ = event()
            (begin,) = conn.execute("select sms.hook_begin_many(%s, 'bench', 10)",
                                    [Jsonb([hook_item(ev, raw)])]).fetchone()[0]  # type: ignore[index]  # fmt: skip
            conn.execute("select sms.finish_deliveries(%s)", [Jsonb([accepted(begin["delivery_id"])])])
    time.sleep(0.6)
    return function_stats(db)


def section_c(db: c.BenchDatabase, sizes: list[int]) -> list[list[str]]:
    """claim_messages (empty queue) and queue_stats as the outbox fills with delivered rows."""
    rows = []
    have = 0
    for size in sizes:
        db.execute(
            "insert into sms.outbox (source, phone, purpose, status, expires_at, sent_at, created_at)"
            " select 'rpc', '8614' || lpad(g::text, 9, '0'), 'default', 'sent', now() + interval '5 minutes', now(),"
            " now() - interval '1 minute' from generate_series(%s::int, %s::int) as g",
            [have + 1, size],
            superuser=True,
        )
        have = size
        db.vacuum()
        for index in (False, True):
            if index:
                db.execute(
                    "create index bench_outbox_pending_expires_idx on sms.outbox (expires_at)"
                    " where status in ('queued', 'sending')",
                    superuser=True,
                )
                db.execute("analyze sms.outbox", superuser=True)
            with psycopg.connect(db.sidecar_url, autocommit=True) as conn:
                times = {}
                for label, sql in (("claim", "select * from sms.claim_messages('bench', 16, 30)"),
                                   ("stats", "select sms.queue_stats()")):  # fmt: skip
                    for _ in range(5):
                        conn.execute(sql).fetchall()
                    t0 = time.perf_counter()
                    for _ in range(50):
                        conn.execute(sql).fetchall()
                    times[label] = (time.perf_counter() - t0) / 50 * 1000
            rows.append([f"{size:,}", "yes" if index else "no", f"{times['claim']:.2f}", f"{times['stats']:.2f}"])
            if index:
                db.execute("drop index sms.bench_outbox_pending_expires_idx", superuser=True)
    return rows


def section_d(fake: c.FakeAliyun) -> list[list[str]]:
    code = f"""\
import time
import _common as c  # the child runs in bench/, so _common is on its path
from sidecar.providers.base import Sms
p = c.aliyun_provider({fake.endpoint!r})
async def main() -> None:
    t = time.monotonic(); await p.start(); print('start', time.monotonic() - t)
    for i in range(3):
        t = time.monotonic()
        result = await p.send(Sms(c.next_phone(), '123456', '1'), c.SEND_TIMEOUT)
        print('send', i, time.monotonic() - t)
        assert result.accepted, result
    await p.close()
c.event_loop().run_until_complete(main())
"""
    runs: dict[str, list[float]] = {}
    for _ in range(3):
        out = subprocess.run([c.PYTHON, "-c", code], cwd=c.BENCH, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            *key, value = line.split()
            runs.setdefault(" ".join(key), []).append(float(value) * 1000)
    return [[k, c.spread(v, 0)] for k, v in runs.items()]


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    facts = c.facts_block()
    n, n_sql, sizes = (100, 300, [2_000, 10_000]) if args.quick else (400, 2_000, [1_000, 10_000, 50_000])
    with c.database({"track_functions": "all"}) as db:
        fake = c.fake_aliyun()
        try:
            a = section_a(db, fake, n)
            hook_detail = section_b_hook(db, n_sql)
            b, detail = section_b(db, n_sql)
            cc = section_c(db, sizes)
            d = section_d(fake)
        finally:
            fake.stop()
    parts = [
        "A. Client-side CPU per operation (µs, median of 3 batches; CPU of the calling thread):",
        c.table(["operation", "µs CPU"], a),
        "B. Server-side time per call (µs wall inside PostgreSQL, single client, no contention):",
        c.table(["workload", "µs per call"], b),
        "Inner functions for one hook request (hook_begin_many + finish_deliveries), per hook request:",
        c.table(["function", "calls", "total µs/call", "self µs/call"], hook_detail),
    ]
    for name, rows in detail.items():
        parts += [f"Inner functions, {name}:", c.table(["function", "calls", "total µs/call", "self µs/call"], rows)]
    parts += [
        "C. Worker queries vs outbox size (ms per call, empty queue; 'index' = a partial index"
        " on (expires_at) where status in ('queued', 'sending')):",
        c.table(["outbox rows", "index", "claim_messages ms", "queue_stats ms"], cc),
        "D. A fresh process's provider: start(), then its first SendSms (ms wall, median (min–max) of 3 processes):",
        c.table(["step", "ms"], d),
    ]
    c.report("costs", "Cost breakdown (`bench/costs.py`)", facts, parts, write=not args.quick and not args.no_write)


if __name__ == "__main__":
    main()
