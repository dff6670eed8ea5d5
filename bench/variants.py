"""The proposed fixes, measured: the hook and the worker with candidate changes applied out of tree.

    .venv/bin/python bench/variants.py [--quick]

Runs bench/variant_serve.py (same config, app and uvicorn settings as `sms-sidecar serve`, plus the
variant) next to the real `sms-sidecar serve` and the framework floor, in the same run:

* hook: wrk at 8 and 32 connections, distinct signed events, variants interleaved per round;
* worker (1 replica): drain of 2,000 codes committed at once, and 1,000 codes at 200/s through
  pgbench, with sms.outbox holding 50,000 delivered rows (a few minutes of history at 200/s; the
  24-hour limits and sms.purge keep far more), without and with a partial index on pending rows;

The PL/pgSQL rewrite of the SQL helpers it once compared (+40-50% verify TPS) is in the migrations now.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as c
import outbox

HOOK_VARIANTS = ["floor", "serve", "lean", "lean,warnlog", "lean,threads8"]
WORKER_VARIANTS = ["serve", "lean", "lean,gauges", "lean,gauges+index"]
INDEX = "create index bench_outbox_pending_expires_idx on sms.outbox (expires_at) where status in ('queued', 'sending')"


def variant_server(db: c.BenchDatabase, fake: c.FakeAliyun, variant: str) -> c.Server:
    if variant == "floor":
        return c.floor_server()
    if variant == "serve":
        return c.sidecar(db, fake, name="serve")
    env = {**c.sidecar_env(db, fake), "BENCH_VARIANT": variant.replace("+index", "")}
    return c.Server([c.PYTHON, str(c.BENCH / "variant_serve.py")], env, f"variant-{variant}")


def hook_section(db: c.BenchDatabase, fake: c.FakeAliyun, rounds: int, seconds: int) -> list[list[str]]:
    servers = {v: variant_server(db, fake, v).start() for v in HOOK_VARIANTS}
    results: dict[tuple[str, int], list[c.WrkResult]] = {}
    try:
        rate = {}
        for name, server in servers.items():  # warm-up, and a first estimate of each one's rate
            warm = c.make_hook_requests(3000 if name == "floor" else 1500)
            rate[name] = c.run_wrk(server.url + "/hooks/send-sms", warm, 8, 1).rps
            warm.unlink()
        for conns in (8, 32):
            for r in range(rounds):
                order = HOOK_VARIANTS if r % 2 == 0 else HOOK_VARIANTS[::-1]
                for name in order:
                    # The floor may reuse events; the sidecars get enough distinct ones for the run.
                    needed = 3000 if name == "floor" else int(max(rate[name], 100) * seconds * 2.5) + 500
                    requests = c.make_hook_requests(needed)
                    time.sleep(0.5)
                    res = c.run_wrk(
                        servers[name].url + "/hooks/send-sms",
                        requests,
                        conns,
                        seconds,
                        server_pid=servers[name].pid,
                        cluster=db.cluster,
                    )
                    requests.unlink()
                    if res.wrapped and name != "floor":
                        raise SystemExit(f"{name}: request file too small")
                    if res.bad or res.socket_errors:
                        raise SystemExit(f"{name}: {res.bad} bad answers, {res.socket_errors} socket errors")
                    results.setdefault((name, conns), []).append(res)
                    rate[name] = res.rps
                    c.log(
                        f"{name:22s} c={conns:2d} round {r + 1}: {res.rps:7.1f} req/s p50 {res.p50_ms:6.1f} ms "
                        f"p99 {res.p99_ms:6.1f} ms cpu {res.server_cpu_pct:.0f}%"
                    )
    finally:
        for server in servers.values():
            server.cleanup()
    rows = []
    for name in HOOK_VARIANTS:
        row: list[object] = [name]
        for conns in (8, 32):
            rs = results[(name, conns)]
            floor = results[("floor", conns)]
            row += [
                c.spread([x.rps for x in rs], 0),
                c.spread([x.p99_ms for x in rs], 1),
                c.spread([a.rps / b.rps * 100 for a, b in zip(rs, floor, strict=True)], 0),
            ]
        rs = results[(name, 8)] + results[(name, 32)]
        row.append(f"{c.median([x.server_cpu_ms_per_req for x in rs]):.2f}")
        row.append(f"{c.median([x.db_cpu_ms_per_req for x in rs]):.2f}")
        rows.append(row)
    return rows


def worker_section(db: c.BenchDatabase, fake: c.FakeAliyun, rounds: int, codes: int) -> list[list[str]]:
    """Each round starts each variant afresh (order alternating), drains `codes` codes committed at once,
    then sends codes/2 at 200/s; the rows it added are deleted before the next variant."""
    db.execute(
        "insert into sms.outbox (source, phone, purpose, status, expires_at, sent_at, created_at)"
        " select 'rpc', '8614' || lpad(g::text, 9, '0'), 'default', 'sent', now() - interval '1 minute', now(),"
        " now() - interval '10 minutes' from generate_series(1, 50000) as g",
        superuser=True,
    )
    db.vacuum()
    drains: dict[str, list[dict[str, float]]] = {}
    steadies: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        script = Path(tmp) / "request.sql"
        script.write_text(outbox.REQUEST_SCRIPT)
        for r in range(rounds):
            for name in WORKER_VARIANTS if r % 2 == 0 else WORKER_VARIANTS[::-1]:
                if "+index" in name:
                    db.execute(INDEX, superuser=True)
                    db.execute("analyze sms.outbox", superuser=True)
                server = variant_server(db, fake, name).start()
                try:
                    time.sleep(1.0)
                    outbox.drain(db, fake, 50)  # warm
                    d = outbox.drain(db, fake, codes, (server.pid,))
                    st = outbox.steady(db, fake, script, codes // 2)
                finally:
                    server.cleanup()
                db.execute("delete from sms.outbox where created_at > now() - interval '5 minutes'", superuser=True)
                db.vacuum()
                if "+index" in name:
                    db.execute("drop index sms.bench_outbox_pending_expires_idx", superuser=True)
                drains.setdefault(name, []).append(d)
                steadies.setdefault(name, []).append(st)
                c.log(
                    f"worker {name:18s} round {r + 1}: drain {d['rate']:.0f}/s, CPU/code worker "
                    f"{d['worker_cpu_ms']:.2f} ms + PostgreSQL {d['db_cpu_ms']:.2f} ms; 200/s p50 {st['p50']:.1f} ms "
                    f"p99 {st['p99']:.1f} ms"
                )
    return [
        [
            name,
            c.spread([x["rate"] for x in drains[name]], 0),
            c.spread([x["worker_cpu_ms"] for x in drains[name]], 2),
            c.spread([x["db_cpu_ms"] for x in drains[name]], 2),
            c.spread([x["p50"] for x in steadies[name]], 1),
            c.spread([x["p99"] for x in steadies[name]], 1),
        ]
        for name in WORKER_VARIANTS
    ]


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    c.check_wrk()
    facts = c.facts_block()
    rounds, seconds, codes = (1, 2, 600) if args.quick else (2, 5, 2000)
    with c.database() as db:
        fake = c.fake_aliyun()
        try:
            hook_rows = hook_section(db, fake, rounds, seconds)
            worker_rows = worker_section(db, fake, rounds, codes)
        finally:
            fake.stop()
    text = "\n\n".join(
        [
            f"Hook: {rounds} rounds x {seconds} s per point, variants interleaved. Worker: 1 replica, {rounds} drains "
            f"of {codes:,} codes and {rounds} x {codes // 2:,} codes at 200/s, sms.outbox holding 50,000 delivered "
            "rows. Median (min–max).",
            c.table(
                [
                    "hook variant",
                    "req/s c=8",
                    "p99 ms c=8",
                    "% floor c=8",
                    "req/s c=32",
                    "p99 ms c=32",
                    "% floor c=32",
                    "server CPU ms/req",
                    "PostgreSQL CPU ms/req",
                ],
                hook_rows,
            ),
            c.table(
                [
                    "worker variant",
                    "drain codes/s",
                    "drain CPU ms/code: worker",
                    "drain CPU ms/code: PostgreSQL",
                    "200/s p50 ms",
                    "200/s p99 ms",
                ],
                worker_rows,
            ),
        ]
    )
    print(text)
    if not args.quick and not args.no_write:
        c.write_results("variants", "## Proposed fixes, measured (`bench/variants.py`)\n\n" + facts + "\n\n" + text)


if __name__ == "__main__":
    main()
