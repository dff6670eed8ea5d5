"""Profile `sms-sidecar serve` under hook load with py-spy (for Findings).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_hook.py [--connections 32] [--seconds 10] [--variant lean]

Starts the same stack as bench/hook.py, drives it with wrk, and samples the serve process with
`py-spy record --gil` (only the thread holding the GIL is sampled, so the shares are shares of the
process's Python CPU). Prints the frames with the largest inclusive share and where the collapsed
stacks were written (open them with any flamegraph tool, or pass --svg).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
import time
from pathlib import Path

import _common as c

GROUPS = {
    "Aliyun SDK call (AliyunProvider.send)": "AliyunProvider.send",
    "lean SendSms (LeanAliyunProvider.send)": "LeanAliyunProvider.send",
    "psycopg (AsyncConnection.execute + pool)": "AsyncConnection.execute|AsyncConnectionPool.",
    "uvicorn h11 protocol": "H11Protocol.",
    "Starlette response send": "Response.__call__",
    "logging (Logger.info/_log)": "Logger._log",
    "webhook verify": "WebhookVerifier.verify",
    "thread-pool submit (run_in_executor)": "BaseEventLoop.run_in_executor",
    "asyncio.wait_for": "wait_for",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--variant", default="", help="a bench/variant_serve.py BENCH_VARIANT instead of the real serve")
    p.add_argument("--svg", action="store_true", help="also write a flame graph SVG")
    args = p.parse_args()
    c.check_wrk()
    spy = c.ROOT / ".venv" / "bin" / "py-spy"
    if not spy.exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    out = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "serve.collapsed"
    with c.database() as db:
        fake = c.fake_aliyun()
        if args.variant:
            env = {**c.sidecar_env(db, fake), "BENCH_VARIANT": args.variant}
            server = c.Server([c.PYTHON, str(c.BENCH / "variant_serve.py")], env, "variant")
        else:
            server = c.sidecar(db, fake)
        try:
            server.start()
            warm = c.make_hook_requests(1500)
            c.run_wrk(server.url + "/hooks/send-sms", warm, 8, 2)
            requests = c.make_hook_requests(int(600 * args.seconds) + 1000)
            argv = [
                str(spy),
                "record",
                "-p",
                str(server.pid),
                "-d",
                str(args.seconds + 2),
                "-r",
                "200",
                "--gil",
                "-f",
                "raw",
                "-o",
                str(out),
            ]
            recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            res = c.run_wrk(
                server.url + "/hooks/send-sms", requests, args.connections, args.seconds, server_pid=server.pid
            )
            recorder.wait()
            if args.svg:
                svg = out.with_suffix(".svg")
                subprocess.run([str(spy), "record", "-p", str(server.pid), "-d", "1", "-o", str(svg)], check=False)
        finally:
            server.cleanup()
            fake.stop()
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = {f.split(" (")[0] for f in stack.split(";")}
        for f in frames:
            inclusive[f] += n
        for label, pattern in GROUPS.items():
            if any(f.startswith(tuple(pattern.split("|"))) for f in frames):
                groups[label] += n
    print(f"load: {res.rps:.0f} req/s at {args.connections} connections, serve CPU {res.server_cpu_pct:.0f}% of a core")
    print(f"py-spy --gil samples: {total}; collapsed stacks: {out}\n")
    print(
        c.table(
            ["component (inclusive)", "% of GIL-held samples"],
            [[k, f"{v / total * 100:.1f}"] for k, v in groups.most_common()],
        )
    )
    print()
    print(c.table(["frame (inclusive)", "%"], [[k, f"{v / total * 100:.1f}"] for k, v in inclusive.most_common(40)]))


if __name__ == "__main__":
    main()
