"""Benchmark 1: the Send SMS hook under load, against the framework floor.

    .venv/bin/python bench/hook.py [--quick]

wrk drives signed GoTrue v2.196 events (each distinct: new phone, user and metadata.uuid, so no
dedup shortcut) at 1, 8 and 32 keep-alive connections against a real `sms-sidecar serve`
(SMS_PROVIDER=aliyun, pointed at the fake Aliyun, which answers at once; sms.settings limits off), and
the same requests against bench/floor_app.py (bare Starlette returning {}, same uvicorn settings).
Rounds alternate floor/sidecar so both see the same machine noise.

Targets: sidecar req/s >= 50% of the floor at 32 connections; sidecar p99 <= 25 ms.
"""

from __future__ import annotations

import time

import _common as c

CONNECTIONS = (1, 8, 32)
THROUGHPUT_TARGET = 0.50  # of the floor, at 32 connections
P99_TARGET_MS = 25.0


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    c.check_wrk()
    facts = c.facts_block()
    rounds, seconds = (1, 2.0) if args.quick else (3, 8.0)
    results: dict[tuple[str, int], list[c.WrkResult]] = {}
    total_sidecar = 0
    with c.database() as db:
        fake = c.fake_aliyun()
        sidecar = c.sidecar(db, fake).start()
        floor = c.floor_server().start()
        floor_requests = c.make_hook_requests(3000)  # the floor only reads them: reuse is harmless
        try:
            c.log(f"sidecar pid {sidecar.pid} ready in {sidecar.startup_seconds:.2f} s; floor pid {floor.pid}")
            # Warm up both (connections, caches, the SDK's HTTP pool), and estimate the sidecar's rate.
            c.run_wrk(floor.url + "/hooks/send-sms", floor_requests, 8, 2)
            warm = c.make_hook_requests(1500)
            estimate = c.run_wrk(sidecar.url + "/hooks/send-sms", warm, 8, 2).rps
            total_sidecar += warm.count
            warm.unlink()
            rate = {n: max(estimate, 50.0) for n in CONNECTIONS}
            for n in CONNECTIONS:
                for r in range(rounds):
                    # Enough distinct events for this run, signed just now (GoTrue's 5-minute window).
                    needed = int(rate[n] * seconds * 2.5) + 500
                    batch = c.make_hook_requests(needed)
                    order = ("floor", "sidecar") if r % 2 == 0 else ("sidecar", "floor")
                    for target in order:
                        time.sleep(1.0)  # let the previous run's stragglers finish
                        server, reqs = (floor, floor_requests) if target == "floor" else (sidecar, batch)
                        res = c.run_wrk(
                            server.url + "/hooks/send-sms", reqs, n, seconds, server_pid=server.pid,
                            cluster=db.cluster if target == "sidecar" else None,
                        )  # fmt: skip
                        if target == "sidecar":
                            if res.wrapped:
                                raise SystemExit(f"request file too small ({needed}) for {res.requests} requests")
                            rate[n] = res.rps
                        results.setdefault((target, n), []).append(res)
                        c.log(
                            f"{target:7s} c={n:2d} round {r + 1}: {res.rps:7.1f} req/s p50 {res.p50_ms:6.2f} ms "
                            f"p99 {res.p99_ms:7.2f} ms bad={res.bad} wrk cpu {res.wrk_cpu_pct:.0f}% "
                            f"server cpu {res.server_cpu_pct:.0f}% machine {res.machine_busy_pct:.0f}%"
                        )
                    total_sidecar += batch.count
                    batch.unlink()
            time.sleep(1.0)
            sent = db.one("select count(*) from sms.outbox where source = 'auth_hook' and status = 'sent'")
            other = db.one("select count(*) from sms.outbox where source = 'auth_hook' and status <> 'sent'")
            completed = sum(x.requests for n in CONNECTIONS for x in results[("sidecar", n)])
            log_lines = sidecar.log_lines()
        finally:
            sidecar.cleanup()
            floor.cleanup()
            floor_requests.unlink()
            fake.stop()

    bad = sum(x.bad + x.socket_errors for xs in results.values() for x in xs)
    rows = []
    for n in CONNECTIONS:
        fl, sc = results[("floor", n)], results[("sidecar", n)]
        ratios = [s.rps / f.rps for s, f in zip(sc, fl, strict=True)]
        rows.append(
            [
                n,
                c.spread([x.rps for x in fl], 0),
                c.spread([x.p50_ms for x in fl], 2),
                c.spread([x.p99_ms for x in fl], 2),
                c.spread([x.rps for x in sc], 0),
                c.spread([x.p50_ms for x in sc], 1),
                c.spread([x.p99_ms for x in sc], 1),
                c.spread([r * 100 for r in ratios], 1),
                f"{max(x.wrk_cpu_pct for x in fl + sc):.0f}%",
                f"{c.median([x.server_cpu_pct for x in fl]):.0f}% / {c.median([x.server_cpu_pct for x in sc]):.0f}%",
                f"{c.median([x.machine_busy_pct for x in fl]):.0f}% / "
                f"{c.median([x.machine_busy_pct for x in sc]):.0f}%",
                f"{c.median([x.server_cpu_ms_per_req for x in fl]):.2f} / "
                f"{c.median([x.server_cpu_ms_per_req for x in sc]):.2f} / "
                f"{c.median([x.db_cpu_ms_per_req for x in sc]):.2f}",
            ]
        )
    headers = [
        "conns",
        "floor req/s",
        "floor p50 ms",
        "floor p99 ms",
        "sidecar req/s",
        "sidecar p50 ms",
        "sidecar p99 ms",
        "sidecar/floor %",
        "wrk CPU max",
        "server CPU floor / sidecar",
        "machine busy floor / sidecar",
        "CPU ms/req: floor / sidecar / PostgreSQL",
    ]
    ratio32 = c.median([s.rps / f.rps for s, f in zip(results[("sidecar", 32)], results[("floor", 32)], strict=True)])
    p99_32 = c.median([x.p99_ms for x in results[("sidecar", 32)]])
    targets = [
        [
            "sidecar req/s >= 50% of floor at 32 conns",
            f"{ratio32 * 100:.1f}%",
            c.verdict(ratio32 * 100, THROUGHPUT_TARGET * 100, higher_is_better=True, unit=" points"),
        ],
        [
            "sidecar p99 <= 25 ms at 32 conns",
            f"{p99_32:.1f} ms",
            c.verdict(p99_32, P99_TARGET_MS, higher_is_better=False, unit=" ms"),
        ],
    ]
    for n in (1, 8):
        p99 = c.median([x.p99_ms for x in results[("sidecar", n)]])
        targets.append(
            [
                f"(also) sidecar p99 <= 25 ms at {n} conns",
                f"{p99:.1f} ms",
                c.verdict(p99, P99_TARGET_MS, higher_is_better=False, unit=" ms"),
            ]
        )
    checks = (
        f"Every hook answer was 200 `{{}}`: {'yes' if bad == 0 else f'NO ({bad} bad answers or socket errors)'}; "
        f"{sent} events delivered to the fake and recorded `sent` ({other} in another state) for "
        f"{completed} completed measured requests plus warm-up and stragglers; the sidecar wrote {log_lines} "
        "log lines."
    )
    text = "\n\n".join(
        [
            f"Rounds: {rounds} x {seconds:.0f} s per point, wrk -t1, closed loop; median (min–max) over rounds. "
            "Server and wrk CPU: % of one core; machine busy: % of all cores (everything running, other tenants too); "
            "CPU ms/req: CPU time of the process (PostgreSQL: all of the cluster's processes) per completed request.",
            c.table(headers, rows),
            c.table(["target", "measured", "verdict"], targets),
            checks,
        ]
    )
    print(text)
    if not args.quick and not args.no_write:
        c.write_results("hook", "## 1. Hook throughput and latency (`bench/hook.py`)\n\n" + facts + "\n\n" + text)


if __name__ == "__main__":
    main()
