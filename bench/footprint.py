"""Benchmark 4: memory and start-up time of `sms-sidecar serve`.

    .venv/bin/python bench/footprint.py [--quick]

Each round starts a fresh `sms-sidecar serve` (SMS_PROVIDER=aliyun, pointed at the fake Aliyun) and
measures: the time from spawning the process to the first `/readyz` 200 (polled every 5 ms); VmRSS
after 2 s idle; the peak VmRSS (sampled every 100 ms) and VmHWM under hook load (wrk, 32 connections,
distinct signed GoTrue events) while the worker also drains 500 queued codes. Reference rows: the
same with SMS_PROVIDER=console (no Aliyun SDK imported), and a bare Python interpreter.

Targets: RSS < 120 MB (idle and under load); start to /readyz 200 < 2 s.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import _common as c

RSS_TARGET_MB, STARTUP_TARGET_S = 120.0, 2.0


def queue_codes(db: c.BenchDatabase, count: int) -> None:
    db.execute(
        "select set_config('request.jwt.claims', '{\"role\": \"service_role\"}', false);"
        " select count(sms.request_code('+8619' || lpad((random() * 999999999)::bigint::text, 9, '0'), 'default'))"
        f" from generate_series(1, {int(count)})"
    )


def one_round(db: c.BenchDatabase, fake: c.FakeAliyun, load_seconds: int, provider: str) -> dict[str, float]:
    extra = {} if provider == "aliyun" else {"SMS_PROVIDER": "console"}
    server = c.sidecar(db, fake, name=f"footprint-{provider}", **extra)
    if provider == "console":
        server.logfile.close()
        Path(server.logfile.name).unlink()
        server.logfile = open("/dev/null", "wb")  # the console provider prints every code
    try:
        server.start()
        time.sleep(2.0)
        idle = c.status_kb(server.pid) / 1024
        peak = hwm = float("nan")
        if load_seconds:
            requests = c.make_hook_requests(int(400 * load_seconds) + 500)
            queue_codes(db, 500)
            with c.Sampler(lambda: c.status_kb(server.pid) / 1024) as sampler:
                c.run_wrk(server.url + "/hooks/send-sms", requests, 32, load_seconds, server_pid=server.pid)
            requests.unlink()
            peak, hwm = sampler.peak, c.status_kb(server.pid, "VmHWM") / 1024
        return {"startup": server.startup_seconds, "idle": idle, "peak": peak, "hwm": hwm}
    finally:
        server.cleanup()


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    c.check_wrk()
    facts = c.facts_block()
    rounds, load_seconds, ref_rounds = (1, 2, 1) if args.quick else (5, 6, 3)
    results: dict[str, list[dict[str, float]]] = {}
    with c.database() as db:
        fake = c.fake_aliyun()
        try:
            for r in range(max(rounds, ref_rounds)):
                for provider in ("aliyun", "console"):
                    if provider == "console" and r >= ref_rounds or provider == "aliyun" and r >= rounds:
                        continue
                    res = one_round(db, fake, load_seconds if provider == "aliyun" else 0, provider)
                    results.setdefault(provider, []).append(res)
                    c.log(
                        f"{provider} round {r + 1}: ready in {res['startup']:.2f} s, idle {res['idle']:.1f} MB, "
                        f"peak under load {res['peak']:.1f} MB (VmHWM {res['hwm']:.1f} MB)"
                    )
        finally:
            fake.stop()
    bare = subprocess.run(
        [c.PYTHON, "-c", "import re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])"],
        capture_output=True,
        text=True,
    )
    bare_mb = int(bare.stdout) / 1024

    a, k = results["aliyun"], results["console"]
    rows = [
        [
            "serve, SMS_PROVIDER=aliyun",
            len(a),
            c.spread([x["startup"] for x in a], 2),
            c.spread([x["idle"] for x in a]),
            c.spread([x["peak"] for x in a]),
            c.spread([x["hwm"] for x in a]),
        ],
        [
            "serve, SMS_PROVIDER=console (reference)",
            len(k),
            c.spread([x["startup"] for x in k], 2),
            c.spread([x["idle"] for x in k]),
            "–",
            "–",
        ],
        ["bare python3 (reference)", 1, "–", f"{bare_mb:.1f}", "–", "–"],
    ]
    startup = c.median([x["startup"] for x in a])
    idle = c.median([x["idle"] for x in a])
    loaded = c.median([x["hwm"] for x in a])
    targets = [
        ["RSS idle < 120 MB", f"{idle:.1f} MB", c.verdict(idle, RSS_TARGET_MB, higher_is_better=False, unit=" MB")],
        [
            "RSS under load < 120 MB (VmHWM)",
            f"{loaded:.1f} MB",
            c.verdict(loaded, RSS_TARGET_MB, higher_is_better=False, unit=" MB"),
        ],
        [
            "start to /readyz 200 < 2 s",
            f"{startup:.2f} s",
            c.verdict(startup, STARTUP_TARGET_S, higher_is_better=False, unit=" s"),
        ],
    ]
    c.report(
        "footprint", "4. Footprint (`bench/footprint.py`)", facts,
        [
            f"Rounds: a fresh process each; load = wrk 32 connections x {load_seconds} s of distinct signed hook "
            "events plus 500 queued codes for the worker. Median (min–max) over rounds; MB = MiB.",
            c.table(
                ["process", "rounds", "start to ready s", "RSS idle MB", "RSS peak under load MB", "VmHWM MB"], rows
            ),  # fmt: skip
            c.table(["target", "measured", "verdict"], targets),
        ],
        write=not args.quick and not args.no_write,
    )  # fmt: skip


if __name__ == "__main__":
    main()
