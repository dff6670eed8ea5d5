"""Benchmark 5: Aliyun's delivery-receipt pushes into a real `sms-sidecar serve`.

    .venv/bin/python bench/receipts.py [--quick]

Codes are requested in one transaction and delivered by the sidecar to the fake Aliyun; then the
fake pushes their receipts (`FakeAliyun.receipt`, as SmsReport's HTTP batch push sends them) to
POST /aliyun/sms-report/<token>, in pushes of 1, 100 and 1,000 receipts, each receipt new, then
the same pushes again (Aliyun repeating itself: nothing to change); 1,000 receipts per push size and round. Per push
size: the answer time (median over the round's pushes; median and spread over the rounds) and the
CPU of the sidecar and of PostgreSQL per receipt. The baseline in the same run is the push of one receipt:
one statement per push means the time per receipt falls as pushes grow.

Target: a push of 1,000 receipts answered within 1 s (Aliyun gives up on an answer after a few
seconds), at under 0.1 ms of PostgreSQL CPU per receipt.
"""

from __future__ import annotations

import time
from typing import Any

import _common as c
import psycopg

from tests.support.fake_aliyun import Send, push_receipts

TOKEN = "bench-receipt-token-0123456789"
SIZES = (1, 100, 1000)
PER_SIZE = 1000  # receipts per push size and round: 1,000 pushes of 1, 10 of 100, 1 of 1,000
PUSH_TARGET_S, PG_TARGET_MS = 1.0, 0.1


def enqueue_and_send(db: c.BenchDatabase, fake: c.FakeAliyun, codes: int) -> list[Send]:
    fake.reset()
    with psycopg.connect(db.authenticator_url) as conn:
        conn.execute("set local role service_role")
        conn.execute("select set_config('request.jwt.claims', '{\"role\": \"service_role\"}', true)")
        conn.execute(
            "select count(public.request_phone_code(phone => '+8616' || lpad((random() * 999999999)::bigint::text,"
            " 9, '0'))) from generate_series(1, %s)",
            [codes],
        )
        conn.commit()
    deadline = time.monotonic() + 120
    while len(fake.sends) < codes and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the last results recorded
    return fake.sends


def pushes(url: str, batches: list[list[dict[str, Any]]], pids: tuple[int, ...], db: c.BenchDatabase) -> dict[str, Any]:
    """Push each batch in turn: every answer's time, and the CPU per receipt over them all (CPU clocks
    tick in 10 ms, so one small push alone would read as 0 or 10 ms)."""
    cpu0 = sum(c.cpu_seconds(p) for p in pids)
    db0 = c.postgres_cpu_seconds(db.cluster)
    times = []
    for batch in batches:
        started = time.perf_counter()
        status, answer = push_receipts(url, batch, timeout=30)
        times.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"push of {len(batch)} answered {status}: {answer}")
    n = sum(len(b) for b in batches)
    return {
        "seconds": c.median(times),
        "sidecar_ms": (sum(c.cpu_seconds(p) for p in pids) - cpu0) * 1000 / n,
        "db_ms": (c.postgres_cpu_seconds(db.cluster) - db0) * 1000 / n,
    }


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    facts = c.facts_block()
    rounds = 1 if args.quick else 5
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    with c.database() as db:
        fake = c.fake_aliyun()
        try:
            with c.sidecar(db, fake, ALIYUN_SMS_REPORT_TOKEN=TOKEN) as server:
                url = f"{server.url}/aliyun/sms-report/{TOKEN}"
                for r in range(rounds):
                    codes = PER_SIZE * len(SIZES)
                    sends = enqueue_and_send(db, fake, codes)
                    if len(sends) < codes:
                        raise RuntimeError(f"only {len(sends)} of {codes} codes were sent")
                    receipts = [fake.receipt(s, success=i % 20 != 0) for i, s in enumerate(sends)]
                    db.vacuum()
                    for k, size in enumerate(SIZES):
                        mine = receipts[k * PER_SIZE : (k + 1) * PER_SIZE]
                        batches = [mine[i : i + size] for i in range(0, PER_SIZE, size)]
                        for kind in ("new", "repeated"):
                            res = pushes(url, batches, (server.pid,), db)
                            runs.setdefault((size, kind), []).append(res)
                            c.log(f"round {r + 1}: {len(batches)} pushes of {size} {kind} receipts, median "
                                  f"{res['seconds'] * 1000:.1f} ms (sidecar {res['sidecar_ms']:.3f}, "
                                  f"PG {res['db_ms']:.3f} ms CPU/receipt)")  # fmt: skip
                stored = db.one("select count(*) from sms.deliveries where delivered is not null")
        finally:
            fake.stop()

    rows = []
    for (size, kind), results in sorted(runs.items()):
        seconds = [x["seconds"] * 1000 for x in results]
        per_receipt = c.median(seconds) / size
        cpu = [c.spread([x[key] for x in results], 3) for key in ("sidecar_ms", "db_ms")]
        rows.append([f"{size} {kind}", c.spread(seconds, 1), c.fmt(per_receipt, 3), *cpu])
    big = runs[(max(SIZES), "new")]
    one = c.median([x["seconds"] for x in runs[(1, "new")]])
    verdicts = [
        ["push of 1,000 new receipts answered within 1 s",
         c.fmt(c.median([x["seconds"] for x in big]), 3) + " s",
         c.verdict(c.median([x["seconds"] for x in big]), PUSH_TARGET_S, higher_is_better=False)],
        ["PostgreSQL CPU per receipt < 0.1 ms (1,000 new)", c.fmt(c.median([x["db_ms"] for x in big]), 3) + " ms",
         c.verdict(c.median([x["db_ms"] for x in big]), PG_TARGET_MS, higher_is_better=False)],
        ["time per receipt, push of 1,000 vs pushes of 1 (same run)",
         c.fmt(c.median([x["seconds"] for x in big]) / 1000 / one, 3) + "x", "(baseline: pushes of 1)"],
    ]  # fmt: skip
    parts = [
        c.table(
            ["push", "answer ms (median, min–max)", "ms per receipt", "sidecar ms CPU/receipt", "PG ms CPU/receipt"],
            rows,
        ),  # fmt: skip
        c.table(["target", "measured", "verdict"], verdicts),
        f"{rounds} rounds; {stored} ledger rows with a verdict at the end (1 in 20 receipts a failure).",
    ]
    c.report("receipts", "5. Delivery-receipt pushes", facts, parts, write=not args.quick and not args.no_write)


if __name__ == "__main__":
    main()
