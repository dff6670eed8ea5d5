"""Benchmark 1: the Send SMS hook under load, next to the Deno edge function it replaces.

    .venv/bin/python bench/hook.py [--quick] [--no-write] [--grid]
    .venv/bin/python bench/hook.py --drip [--no-write]

wrk drives distinct signed GoTrue v2.196 events (new phone, user and metadata.uuid each, so no dedup
shortcut) over keep-alive connections against (a) a real `sms-sidecar serve` (SMS_PROVIDER=aliyun,
sms.settings limits off) and (b) the Deno function of bookshiyi/supabase-aliyun-sms-sender
(bench/deno/index.ts under `deno run`), both pointed at the same fake Aliyun, which holds each SendSms
answer for the point's provider latency. Points (latency ms, connections): (0, 32), (100, 256),
(200, 512); --grid: every latency with every connection count. Rounds alternate the sides and their
order. At (0, 32) the framework floor (bench/floor_app.py) runs too, for the targets.

--drip: the fake writes its SendSms answer one byte a second; 100 hooks at once through GoTrue's caller
(tests/support/gotrue.py) must each be answered within 4 s, and a normal hook 10 s later must succeed in
< 200 ms. Each side against a fresh fake.

Targets: sidecar req/s >= 50% of the floor at (0 ms, 32 connections); sidecar p99 <= 25 ms there.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections import Counter
from collections.abc import Sequence

import _common as c
import httpx

from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import GoTrueHookCaller, HookResult

LATENCIES_MS = (0, 100, 200)
CONNECTIONS = (32, 256, 512)
POINTS = ((0, 32), (100, 256), (200, 512))
FLOOR_POINT = (0, 32)
THROUGHPUT_TARGET = 0.50  # of the floor, at FLOOR_POINT
P99_TARGET_MS = 25.0
PATHS = {"sidecar": "/hooks/send-sms", "deno": "/functions/v1/supabase-aliyun-sms-sender", "floor": "/hooks/send-sms"}
# What counts as success: the sidecar and the floor answer 200 {}; the Deno function answers success
# with 200 {"msg": ..., "result": ...}, which GoTrue accepts, and failures with an `error` member.
ACCEPT = {"sidecar": "empty", "deno": "gotrue", "floor": "empty"}
# The default HTTP_MAX_CONNECTIONS (500) refuses connections 501-512 with an immediate 503, and wrk's
# reconnect loop turns those 12 into thousands of refusals a second (GoTrue would fail those users
# once each, "Service currently unavailable due to hook"). Raised so that the hook path is measured.
SIDECAR_ENV = {"HTTP_MAX_CONNECTIONS": "1024"}
DRIP_HOOKS, DRIP_ANSWER_S, RECOVERY_AFTER_S, RECOVERY_MS = 100, 4.0, 10.0, 200.0

Point = tuple[int, int]
Key = tuple[str, Point]


def settle(fake: FakeAliyun, quiet: float = 0.5, limit: float = 8.0) -> None:
    """Wait (1 s at least) until the fake has had no request for `quiet` s: the last run's stragglers
    (requests queued in a server when wrk stopped) are done."""
    time.sleep(1.0)
    seen, deadline = fake.requests_seen, time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if fake.requests_seen == seen:
            return
        seen = fake.requests_seen


def deno_version() -> str:
    out = subprocess.run([str(c.deno_binary()), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("\n", 1)[0]


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--grid", action="store_true", help="every provider latency with every connection count")
    p.add_argument("--drip", action="store_true", help="the trickling-provider scenario instead")
    args = p.parse_args()
    write = not args.quick and not args.no_write
    if args.drip:
        return drip(write=write)
    c.check_wrk()
    facts = c.facts_block({"sidecar": c.sidecar_code(), "deno": deno_version(),
                           "Deno function": "bookshiyi/supabase-aliyun-sms-sender@ba962e7"})  # fmt: skip
    rounds, seconds = (1, 2.0) if args.quick else (3, 8.0)
    points = [(ms, n) for ms in LATENCIES_MS for n in CONNECTIONS] if args.grid else list(POINTS)
    results: dict[Key, list[c.WrkResult]] = {}
    fake_cpu: dict[Key, list[float]] = {}
    with c.database() as db:
        fake = c.fake_aliyun()
        servers = {"sidecar": c.sidecar(db, fake, **SIDECAR_ENV), "deno": c.deno_server(fake)}
        servers["floor"] = c.floor_server()
        floor_requests = c.make_hook_requests(3000)  # the floor only reads them: reuse is harmless
        try:
            for server in servers.values():
                server.start()
            c.log(", ".join(f"{k} pid {s.pid} ready in {s.startup_seconds:.2f} s" for k, s in servers.items()))
            # Warm up (connections, caches, the provider's connection pool) and estimate each side's rate.
            c.run_wrk(servers["floor"].url + PATHS["floor"], floor_requests, 8, 2)
            rate: dict[str, float] = {}
            for side, count in (("sidecar", 1500), ("deno", 6000)):
                warm = c.make_hook_requests(count)
                rate[side] = max(c.run_wrk(servers[side].url + PATHS[side], warm, 8, 2, accept=ACCEPT[side]).rps, 50)
                warm.unlink()
            for point in points:
                fake.latency = point[0] / 1000
                sides = ("sidecar", "deno", "floor") if point == FLOOR_POINT else ("sidecar", "deno")
                for r in range(rounds):
                    for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                        # Enough distinct events for this run, signed just now (GoTrue's 5-minute window).
                        needed = int(rate.get(side, 0) * seconds * 2.5) + 500
                        reqs = floor_requests if side == "floor" else c.make_hook_requests(needed)
                        settle(fake)
                        cpu0 = c.cpu_seconds(os.getpid())  # this process: the fake's threads
                        res = c.run_wrk(
                            servers[side].url + PATHS[side], reqs, point[1], seconds, server_pid=servers[side].pid,
                            cluster=db.cluster if side == "sidecar" else None, accept=ACCEPT[side],
                        )  # fmt: skip
                        fake_pct = (c.cpu_seconds(os.getpid()) - cpu0) / res.seconds * 100
                        if side != "floor":
                            reqs.unlink()
                            if res.wrapped:
                                raise SystemExit(f"request file too small ({needed}) for {res.requests} requests")
                            rate[side] = max(rate[side], res.rps)
                        results.setdefault((side, point), []).append(res)
                        fake_cpu.setdefault((side, point), []).append(fake_pct)
                        c.log(
                            f"{side:7s} {point[0]:3d} ms c={point[1]:3d} round {r + 1}: {res.ok_rps:7.1f} ok/s "
                            f"p50 {res.p50_ms:7.2f} ms p99 {res.p99_ms:7.2f} ms failures {res.failures} "
                            f"server cpu {res.server_cpu_pct:.0f}% fake cpu {fake_pct:.0f}% "
                            f"wrk cpu {res.wrk_cpu_pct:.0f}% machine {res.machine_busy_pct:.0f}%"
                        )
            settle(fake)
            fake.latency = 0.0
            # The Lua script's success rules, checked against GoTrue's own reading of an answer.
            gotrue_ok = {
                side: GoTrueHookCaller(servers[side].url + PATHS[side], c.HOOK_SECRET, version=c.GOTRUE_VERSION)
                .call(c.hook_event())
                .ok
                for side in ("sidecar", "deno")
            }
            time.sleep(0.5)
            sent = db.one("select count(*) from sms.outbox where source = 'auth_hook' and status = 'sent'")
            other = db.one("select count(*) from sms.outbox where source = 'auth_hook' and status <> 'sent'")
            by_signature = Counter(s.signature_version for s in fake.sends)  # the SDK signs V3, index.ts V2
            rejected = len(fake.rejected)
        finally:
            fake.stop()
            for server in servers.values():
                server.cleanup()
            floor_requests.unlink()

    def successes(side: str) -> int:
        return sum(x.requests - x.bad for pt in points for x in results[(side, pt)])

    checks = (
        f"The fake refused {rejected} requests (signatures, parameters). GoTrue v2.196's caller "
        f"(tests/support/gotrue.py) read a fresh answer as success: sidecar {yes(gotrue_ok['sidecar'])}, "
        f"Deno {yes(gotrue_ok['deno'])}. The sidecar recorded {sent} events `sent` ({other} in another state) "
        f"for {successes('sidecar')} measured successes plus warm-up and stragglers; the fake accepted "
        f"{by_signature['v3']} V3-signed (SDK) and {by_signature['v2']} V2-signed (index.ts) SendSms, for "
        f"{successes('deno')} measured Deno successes plus warm-up and stragglers. The sidecar ran with "
        f"HTTP_MAX_CONNECTIONS={SIDECAR_ENV['HTTP_MAX_CONNECTIONS']} (default 500: connections 501–512 would "
        "be refused)."
    )
    c.report(
        "hook", "1. Hook throughput and latency (`bench/hook.py`)", facts,
        [
            f"Rounds: {rounds} x {seconds:.0f} s per point and side, wrk -t1, closed loop, sides interleaved; "
            "median (min–max) over rounds. Latency: the fake's delay before each SendSms answer. req/s: "
            "successful answers per second; p50/p99: wrk's, over all answers; failures: all rounds, answers "
            "that are not a success (sidecar: other than 200 `{}`; Deno: non-200, or an `error` member) plus "
            "socket errors. CPU: % of one core; machine busy: % of all cores (other tenants too); CPU ms/req: "
            "the process's (PostgreSQL: all of the cluster's processes) CPU time per completed request; fake: "
            "this benchmark's process, which serves the fake.",
            main_table(results, points),
            cpu_table(results, fake_cpu, points),
            targets_table(results),
            checks,
        ],
        write=write,
    )  # fmt: skip


def side_cells(runs: Sequence[c.WrkResult]) -> list[str]:
    failures, answers = sum(x.failures for x in runs), sum(x.requests for x in runs)
    share = f" ({failures / answers * 100:.1f}%)" if failures and answers else ""
    return [
        c.spread([x.ok_rps for x in runs], 0),
        c.spread([x.p50_ms for x in runs], 1),
        c.spread([x.p99_ms for x in runs], 1),
        f"{failures:,}{share}",
    ]


def main_table(results: dict[Key, list[c.WrkResult]], points: Sequence[Point]) -> str:
    rows = []
    for pt in points:
        sc, dn = results[("sidecar", pt)], results[("deno", pt)]
        ratios = [s.ok_rps / d.ok_rps * 100 if d.ok_rps else float("nan") for s, d in zip(sc, dn, strict=True)]
        rows.append([pt[0], pt[1], *side_cells(sc), *side_cells(dn), c.spread(ratios, 1)])
    headers = ["latency ms", "conns", "sidecar req/s", "sidecar p50 ms", "sidecar p99 ms", "sidecar failures",
               "Deno req/s", "Deno p50 ms", "Deno p99 ms", "Deno failures", "sidecar/Deno req/s %"]  # fmt: skip
    return c.table(headers, rows)


def cpu_table(results: dict[Key, list[c.WrkResult]], fake_cpu: dict[Key, list[float]], points: Sequence[Point]) -> str:
    def medians(fmt: str, *values: Sequence[float]) -> str:
        return " / ".join(format(c.median(v), fmt) for v in values)

    rows = []
    for pt in points:
        sc, dn = results[("sidecar", pt)], results[("deno", pt)]
        rows.append(
            [
                pt[0],
                pt[1],
                medians(".2f", [x.server_cpu_ms_per_req for x in sc], [x.db_cpu_ms_per_req for x in sc],
                        [x.server_cpu_ms_per_req for x in dn]),
                medians(".0f", [x.server_cpu_pct for x in sc], [x.server_cpu_pct for x in dn]),
                medians(".0f", fake_cpu[("sidecar", pt)], fake_cpu[("deno", pt)]),
                f"{max(x.wrk_cpu_pct for x in sc + dn):.0f}",
                medians(".0f", [x.machine_busy_pct for x in sc], [x.machine_busy_pct for x in dn]),
            ]
        )  # fmt: skip
    headers = ["latency ms", "conns", "CPU ms/req: sidecar / PostgreSQL / Deno", "server CPU %: sidecar / Deno",
               "fake CPU %: sidecar / Deno runs", "wrk CPU % max", "machine busy %: sidecar / Deno runs"]  # fmt: skip
    return c.table(headers, rows)


def targets_table(results: dict[Key, list[c.WrkResult]]) -> str:
    fl, sc = results[("floor", FLOOR_POINT)], results[("sidecar", FLOOR_POINT)]
    ratio = c.median([s.ok_rps / f.ok_rps for s, f in zip(sc, fl, strict=True)])
    p99 = c.median([x.p99_ms for x in sc])
    floor = (
        f"{c.spread([x.ok_rps for x in fl], 0)} req/s; p50 {c.median([x.p50_ms for x in fl]):.2f} ms; "
        f"p99 {c.median([x.p99_ms for x in fl]):.2f} ms"
    )
    rows = [
        ["floor at 0 ms, 32 conns", floor, "(reference)"],
        ["sidecar req/s >= 50% of floor at 0 ms, 32 conns", f"{ratio * 100:.1f}%",
         c.verdict(ratio * 100, THROUGHPUT_TARGET * 100, higher_is_better=True, unit=" points")],
        ["sidecar p99 <= 25 ms at 0 ms, 32 conns", f"{p99:.1f} ms",
         c.verdict(p99, P99_TARGET_MS, higher_is_better=False, unit=" ms")],
    ]  # fmt: skip
    return c.table(["target", "measured", "verdict"], rows)


# --- the trickling provider ---------------------------------------------------------------------------


class _SharedTransport(httpx.AsyncBaseTransport):
    """One connection pool for all the calls of a burst, which each open and close a client: a new
    client per call builds an SSL context, ~10 ms of this process's CPU that would delay the burst."""

    def __init__(self) -> None:
        self.pool = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.pool.handle_async_request(request)

    async def aclose(self) -> None:  # the calls' clients close it; the burst does, at its end
        pass


async def _burst(url: str, n: int) -> list[tuple[float, HookResult]]:
    """`n` hooks at once, each on its own connection, as GoTrue calls them; the time of each to its result."""
    transport = _SharedTransport()
    caller = GoTrueHookCaller(url, c.HOOK_SECRET, version=c.GOTRUE_VERSION, async_transport=transport)

    async def timed(event: dict[str, object]) -> tuple[float, HookResult]:
        started = time.monotonic()
        result = await caller.call_async(event)
        return time.monotonic() - started, result

    try:
        return list(await asyncio.gather(*(timed(c.hook_event()) for _ in range(n))))
    finally:
        await transport.pool.aclose()


def drip_side(side: str, db: c.BenchDatabase) -> list[str]:
    fake = c.fake_aliyun()
    server = c.sidecar(db, fake) if side == "sidecar" else c.deno_server(fake)
    try:
        server.start()
        caller = GoTrueHookCaller(server.url + PATHS[side], c.HOOK_SECRET, version=c.GOTRUE_VERSION)
        warm = caller.call(c.hook_event())  # a first send (opens the connections)
        fake.drip = 1.0
        started = time.monotonic()
        burst = asyncio.run(_burst(server.url + PATHS[side], DRIP_HOOKS))
        taken = len(fake.sends) - 1
        time.sleep(max(0.0, started + RECOVERY_AFTER_S - time.monotonic()))
        fake.drip = 0.0
        t0 = time.monotonic()
        normal = caller.call(c.hook_event())
        normal_ms = (time.monotonic() - t0) * 1000
    finally:
        fake.stop()  # ends the drips
        server.cleanup()
    answered = [s for s, r in burst if r.attempts and r.attempts[-1].status is not None]
    in_time = sum(1 for s in answered if s <= DRIP_ANSWER_S)
    told = Counter("success" if r.ok else f"{r.status} {r.message}" for _, r in burst)
    seconds = [s for s, _ in burst]
    c.log(f"drip {side}: {in_time}/{DRIP_HOOKS} answered within {DRIP_ANSWER_S:.0f} s; normal hook {normal_ms:.0f} ms")
    return [
        "sidecar" if side == "sidecar" else "Deno",
        yes(warm.ok),
        str(taken),
        f"{in_time} / {DRIP_HOOKS}",
        f"{c.median(seconds):.2f} / {max(seconds):.2f}",
        "; ".join(f"{n} x {k}" for k, n in told.most_common(3)),
        f"{'success' if normal.ok else f'{normal.status} {normal.message}'}, {normal_ms:.0f} ms",
        f"{yes(in_time == DRIP_HOOKS)} / {yes(normal.ok and normal_ms < RECOVERY_MS)}",
    ]


def drip(*, write: bool) -> None:
    facts = c.facts_block({"sidecar": c.sidecar_code(), "deno": deno_version()})
    with c.floor_server() as floor:  # the burst's own time: against a server that answers at once
        reference = max(s for s, _ in asyncio.run(_burst(floor.url + PATHS["floor"], DRIP_HOOKS)))
    with c.database() as db:
        rows = [drip_side(side, db) for side in ("sidecar", "deno")]
    headers = ["side", "warm-up hook ok", "SendSms taken while dripping", f"answered within {DRIP_ANSWER_S:.0f} s",
               "s to GoTrue's result: median / max", "what GoTrue told users (top 3)",
               f"normal hook {RECOVERY_AFTER_S:.0f} s later",
               f"all answered within {DRIP_ANSWER_S:.0f} s / normal hook ok in < {RECOVERY_MS:.0f} ms"]  # fmt: skip
    text = (
        f"The fake writes each SendSms answer one byte a second (~250 bytes); {DRIP_HOOKS} hooks at once, each "
        "on its own connection, through GoTrue v2.196's caller (tests/support/gotrue.py: its 5 s deadline, its "
        f"retries); {RECOVERY_AFTER_S:.0f} s after they started the fake answers normally again and one more "
        "hook is sent. Each side against a fresh fake, with production defaults; 5.0 s to GoTrue's result "
        f"means GoTrue gave up. The same burst against the framework floor (bench/floor_app.py) took at most "
        f"{reference:.2f} s: the client's own share."
    )
    c.report("hook-drip", "1b. Hook with a trickling provider (`bench/hook.py --drip`)", facts,
             [text, c.table(headers, rows)], write=write)  # fmt: skip


if __name__ == "__main__":
    main()
