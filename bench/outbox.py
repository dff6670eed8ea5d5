"""Benchmark 3: the delivery worker draining sms.outbox through the fake Aliyun.

    .venv/bin/python bench/outbox.py [--quick]

Three measurements, with 1 and 2 real `sms-sidecar serve` replicas (default worker settings):

* fake alone: the most SendSms/s the fake sustains for the sidecar's provider in a client process
  (AliyunProvider.send in 16 concurrent tasks over its one session, in 1 and in 2 processes), the
  reference for the drain rate;
* steady: codes requested through public.request_phone_code (pgbench -R 200, PostgREST-shaped
  transactions) at 200 codes/s, 10,000 in all, in rounds of 2,000; latency = the fake's
  Send.received_at minus the code's outbox.created_at (matched by OutId = delivery id);
* drain: 2,500 codes committed in one transaction while the replicas idle, 4 rounds; rate =
  codes / (last received_at - commit).

Targets: steady p50 < 50 ms and p99 < 250 ms; drain >= 80% of the fake alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import psycopg

P50_TARGET_MS, P99_TARGET_MS, DRAIN_TARGET = 50.0, 250.0, 0.80
RATE = 200
FAKE_ALONE_TASKS = 16
REQUEST_SCRIPT = (
    "\\set p random(0, 999999999)\n\\set u random(1, 1000000000)\n"
    + c.postgrest_transaction("request_phone_code", "u")
    + "select public.request_phone_code(phone => '+8617' || lpad(:p::text, 9, '0'));\ncommit;\n"
)


def provider_client(endpoint: str, tasks: int, seconds: float) -> None:
    """Child mode: AliyunProvider.send (the sidecar's own provider, one session) in `tasks` concurrent
    tasks for `seconds`, in the event loop `serve` runs."""
    from sidecar.providers.base import Sms

    provider = c.aliyun_provider(endpoint)

    async def run() -> dict[str, float]:
        await provider.start()
        for i in range(20):
            await provider.send(Sms(c.next_phone(), "123456", str(i)), c.SEND_TIMEOUT)
        counts, failures = [0] * tasks, [0]
        loop = asyncio.get_running_loop()
        stop = loop.time() + seconds

        async def sender(k: int) -> None:
            while loop.time() < stop:
                result = await provider.send(Sms(c.next_phone(), "123456", str(k)), c.SEND_TIMEOUT)
                counts[k] += 1
                if not result.accepted:
                    failures[0] += 1

        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(sender(k) for k in range(tasks)))
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        await provider.close()
        return {"sends": sum(counts), "seconds": wall, "cpu": cpu, "failures": failures[0]}

    print(json.dumps(c.event_loop().run_until_complete(run())))


def fake_alone(fake: c.FakeAliyun, processes: int, tasks: int, seconds: float) -> dict[str, float]:
    me = os.getpid()
    cpu0 = c.cpu_seconds(me)
    argv = [c.PYTHON, __file__, "--provider-client", fake.endpoint, str(tasks), str(seconds)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    fake_cpu = c.cpu_seconds(me) - cpu0
    sends = sum(o["sends"] for o in outs)
    wall = max(o["seconds"] for o in outs)
    return {
        "rate": sends / wall,
        "client_cpu_ms": sum(o["cpu"] for o in outs) / sends * 1000,
        "fake_cpu_ms": fake_cpu / (sends + 20 * processes) * 1000,
        "failures": sum(o["failures"] for o in outs),
    }


def latencies(db: c.BenchDatabase, fake: c.FakeAliyun) -> list[float]:
    """received_at - outbox.created_at, in ms, for every send the fake recorded since its last reset."""
    sends = {int(s.out_id): s.received_at for s in fake.sends if s.out_id}
    rows = db.execute(
        "select d.id, extract(epoch from o.created_at)::float8 from sms.deliveries as d"
        " join sms.outbox as o on o.id = d.message_id where d.id = any(%s)",
        [list(sends)],
    )
    return [(sends[i] - created) * 1000 for i, created in rows]


def steady(db: c.BenchDatabase, fake: c.FakeAliyun, script: Path, codes: int) -> dict[str, float]:
    fake.reset()
    clients = 4
    argv = [
        str(c.LocalCluster().bindir / "pgbench"),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        "2",
        "-R",
        str(RATE),
        "-t",
        str(codes // clients),
        "-f",
        str(script),
        "-h",
        "127.0.0.1",
        "-p",
        str(db.port),
        "-U",
        "authenticator",
        "postgres",
    ]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out.stderr}")
    enqueue_seconds = time.monotonic() - started
    expected = codes // clients * clients
    deadline = time.monotonic() + 60
    while len(fake.sends) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    lat = latencies(db, fake)
    lost = expected - len(lat)
    return {
        "rate": expected / enqueue_seconds,
        "p50": c.percentile(lat, 50),
        "p99": c.percentile(lat, 99),
        "max": max(lat) if lat else float("nan"),
        "missing": lost,
    }


def drain(db: c.BenchDatabase, fake: c.FakeAliyun, codes: int, pids: tuple[int, ...] = ()) -> dict[str, float]:
    """Commit `codes` codes at once, wait until the fake has them all; rate, first send, and the CPU the
    replicas (`pids`) and the cluster spent from the commit to the last send, per code."""
    fake.reset()
    with psycopg.connect(db.authenticator_url) as conn:
        conn.execute("set local role service_role")
        conn.execute("select set_config('request.jwt.claims', '{\"role\": \"service_role\"}', true)")
        conn.execute(
            "select count(public.request_phone_code(phone => '+8618' || lpad((random() * 999999999)::bigint::text,"
            " 9, '0'))) from generate_series(1, %s)",
            [codes],
        )
        committed = conn.execute("select extract(epoch from clock_timestamp())::float8").fetchone()[0]  # type: ignore[index]
        conn.commit()
    cpu0 = [c.cpu_seconds(pid) for pid in pids]
    db0 = c.postgres_cpu_seconds(db.cluster)
    deadline = time.monotonic() + 120
    while len(fake.sends) < codes and time.monotonic() < deadline:
        time.sleep(0.05)
    db_cpu = c.postgres_cpu_seconds(db.cluster) - db0
    cpu = sum(c.cpu_seconds(pid) - before for pid, before in zip(pids, cpu0, strict=True))
    sends = fake.sends
    if not sends:
        nan = float("nan")
        return {"rate": nan, "first_ms": nan, "missing": codes, "worker_cpu_ms": nan, "db_cpu_ms": nan}
    last = max(s.received_at for s in sends)
    first = min(s.received_at for s in sends)
    return {
        "rate": len(sends) / (last - committed),
        "first_ms": (first - committed) * 1000,
        "missing": codes - len(sends),
        "worker_cpu_ms": cpu * 1000 / codes if pids else float("nan"),
        "db_cpu_ms": db_cpu * 1000 / codes,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--provider-client":
        provider_client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    facts = c.facts_block()
    if args.quick:
        fa_rounds, fa_seconds, st_rounds, st_codes, dr_rounds, dr_codes = 1, 2.0, 1, 400, 1, 500
    else:
        fa_rounds, fa_seconds, st_rounds, st_codes, dr_rounds, dr_codes = 3, 4.0, 5, 2000, 4, 2500
    fa: dict[int, list[dict[str, float]]] = {}
    st: dict[int, list[dict[str, float]]] = {}
    dr: dict[int, list[dict[str, float]]] = {}
    with c.database() as db, tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        script = Path(tmp) / "request.sql"
        script.write_text(REQUEST_SCRIPT)
        fake = c.fake_aliyun()
        try:
            for r in range(fa_rounds):
                for procs in (1, 2):
                    res = fake_alone(fake, procs, FAKE_ALONE_TASKS, fa_seconds)
                    fa.setdefault(procs, []).append(res)
                    c.log(
                        f"fake alone, {procs} client process(es) x {FAKE_ALONE_TASKS} tasks, round {r + 1}: "
                        f"{res['rate']:.0f}/s "
                        f"(client {res['client_cpu_ms']:.2f} ms CPU/send, fake {res['fake_cpu_ms']:.2f} ms CPU/send)"
                    )
            for replicas in (1, 2):
                servers = [c.sidecar(db, fake, name=f"sidecar{i}") for i in range(replicas)]
                try:
                    for s in servers:
                        s.start()
                    time.sleep(1.0)  # LISTEN connections up
                    # A fresh process's first deliveries open the provider's connections and the pool's:
                    # kept out of the rounds (costs.py D measures a first send).
                    drain(db, fake, 50 * replicas)
                    for r in range(st_rounds):
                        res = steady(db, fake, script, st_codes)
                        st.setdefault(replicas, []).append(res)
                        c.log(
                            f"steady {replicas} replica(s) round {r + 1}: enqueued {res['rate']:.0f}/s, "
                            f"p50 {res['p50']:.1f} ms p99 {res['p99']:.1f} ms max {res['max']:.0f} ms, "
                            f"missing {res['missing']}"
                        )
                        time.sleep(1.0)
                    db.vacuum()
                    for r in range(dr_rounds):
                        res = drain(db, fake, dr_codes, tuple(s.pid for s in servers))
                        dr.setdefault(replicas, []).append(res)
                        c.log(
                            f"drain {replicas} replica(s) round {r + 1}: {res['rate']:.0f}/s, first send after "
                            f"{res['first_ms']:.0f} ms, missing {res['missing']}"
                        )
                        time.sleep(1.0)
                    cpu = {s.name: c.cpu_seconds(s.pid) for s in servers}
                finally:
                    for s in servers:
                        s.cleanup()
                c.log(f"replica CPU seconds: {cpu}")
            dup = db.one(
                "select count(*) from (select message_id from sms.deliveries where outcome = 'accepted'"
                " group by 1 having count(*) > 1) as x"
            )
            failed = db.one("select count(*) from sms.outbox where status <> 'sent'")
            rejected = fake.rejected
        finally:
            fake.stop()

    fake_best = max(c.median([x["rate"] for x in fa[p]]) for p in fa)
    rows_fa = [
        [
            f"{p} process x {FAKE_ALONE_TASKS} tasks",
            c.spread([x["rate"] for x in fa[p]], 0),
            c.spread([x["client_cpu_ms"] for x in fa[p]], 2),
            c.spread([x["fake_cpu_ms"] for x in fa[p]], 2),
        ]
        for p in sorted(fa)
    ]
    rows = []
    for replicas in (1, 2):
        steady_runs, drain_runs = st[replicas], dr[replicas]
        rows.append(
            [
                replicas,
                c.spread([x["rate"] for x in steady_runs], 0),
                c.spread([x["p50"] for x in steady_runs], 1),
                c.spread([x["p99"] for x in steady_runs], 1),
                c.spread([x["max"] for x in steady_runs], 0),
                c.spread([x["rate"] for x in drain_runs], 0),
                c.spread([x["rate"] / fake_best * 100 for x in drain_runs], 0),
                c.spread([x["first_ms"] for x in drain_runs], 0),
                c.spread([x["worker_cpu_ms"] for x in drain_runs], 2),
                c.spread([x["db_cpu_ms"] for x in drain_runs], 2),
            ]
        )
    targets = []
    for replicas in (1, 2):
        p50 = c.median([x["p50"] for x in st[replicas]])
        p99 = c.median([x["p99"] for x in st[replicas]])
        share = c.median([x["rate"] for x in dr[replicas]]) / fake_best
        targets += [
            [
                f"{replicas} replica(s): steady p50 < 50 ms",
                f"{p50:.1f} ms",
                c.verdict(p50, P50_TARGET_MS, higher_is_better=False, unit=" ms"),
            ],
            [
                f"{replicas} replica(s): steady p99 < 250 ms",
                f"{p99:.1f} ms",
                c.verdict(p99, P99_TARGET_MS, higher_is_better=False, unit=" ms"),
            ],
            [
                f"{replicas} replica(s): drain >= 80% of fake alone",
                f"{share * 100:.0f}%",
                c.verdict(share * 100, DRAIN_TARGET * 100, higher_is_better=True, unit=" points"),
            ],
        ]
    missing = sum(int(x["missing"]) for xs in list(st.values()) + list(dr.values()) for x in xs)
    checks = (
        f"Every code reached the fake: {'yes' if missing == 0 else f'NO, {missing} missing'}; messages accepted "
        f"twice: {dup}; outbox rows not `sent` at the end: {failed}; fake rejections: {len(rejected)}."
    )
    c.report(
        "outbox", "3. Outbox delivery (`bench/outbox.py`)", facts,
        [
            f"Fake alone: {fa_rounds} rounds x {fa_seconds:.0f} s. Steady: {st_rounds} rounds x {st_codes:,} codes at "
            f"{RATE}/s (pgbench -R, Poisson arrivals). Drain: {dr_rounds} rounds x {dr_codes:,} codes committed at "
            "once. Median (min–max) over rounds.",
            c.table(["fake alone", "SendSms/s", "client CPU ms/send", "fake CPU ms/send"], rows_fa),
            c.table(
                [
                    "replicas",
                    "steady enqueue/s",
                    "steady p50 ms",
                    "steady p99 ms",
                    "steady max ms",
                    "drain codes/s",
                    "drain % of fake alone",
                    "drain first send ms",
                    "drain CPU ms/code: replicas",
                    "drain CPU ms/code: PostgreSQL",
                ],
                rows,
            ),  # fmt: skip
            c.table(["target", "measured", "verdict"], targets),
            checks,
        ],
        write=not args.quick and not args.no_write,
    )  # fmt: skip


if __name__ == "__main__":
    main()
