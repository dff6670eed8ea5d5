"""Profile `sms-sidecar serve` under hook load with py-spy (for Findings).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_hook.py [--connections 32] [--seconds 10] [--latency 0] [--svg]

Starts the same stack as bench/hook.py, drives it with wrk, and samples the serve process with
`py-spy record --gil` (only the thread holding the GIL is sampled, so the shares are shares of the
process's Python CPU). Prints the share of samples per component (GROUPS: a sample counts for a
component when any of its frames matches), the frames with the largest inclusive share, and where
the collapsed stacks were written (open them with any flamegraph tool, or pass --svg).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
import time
from pathlib import Path

import _common as c

# Component: a regular expression searched in each frame, py-spy's "Class.function (package/module.py:line)".
GROUPS = {
    "Aliyun send (AliyunProvider._call: sign, aiohttp request, read)": r"^AliyunProvider\._call ",
    "  signing (AliyunProvider._signed: SDK models, ACS3 signature)": r"^AliyunProvider\._signed ",
    "  aiohttp ClientSession._request": r"^ClientSession\._request ",
    "aiohttp, any frame (also its response parsing, run by the loop)": r"\(aiohttp/",
    "psycopg (AsyncConnection.execute + pool)": r"^(AsyncConnection\.execute|AsyncConnectionPool\.)",
    "psycopg, any frame": r"\(psycopg(_pool)?/",
    "uvicorn httptools protocol (parsing, slow-client bounds)": r"^(Bounded)?HttpTools(Protocol)?\.",
    "Starlette response send": r"^Response\.__call__ ",
    "logging (Logger._log)": r"^Logger\._log ",
    "webhook verify (WebhookVerifier.verify)": r"^WebhookVerifier\.verify ",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--latency", type=int, default=0, help="the fake's delay before each SendSms answer, ms")
    p.add_argument("--svg", action="store_true", help="also write a flame graph SVG")
    args = p.parse_args()
    c.check_wrk()
    spy = Path(c.PYTHON).with_name("py-spy")
    if not spy.exists():
        raise SystemExit(f"py-spy is not installed next to {c.PYTHON}: pip install py-spy")
    out = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "serve.collapsed"
    with c.database() as db:
        fake = c.fake_aliyun()
        server = c.sidecar(db, fake, HTTP_MAX_CONNECTIONS="1024")
        files: list[c.HookRequests] = []
        try:
            server.start()
            files.append(warm := c.make_hook_requests(1500))
            rate = c.run_wrk(server.url + "/hooks/send-sms", warm, 8, 2).rps
            fake.latency = args.latency / 1000
            files.append(requests := c.make_hook_requests(int(max(rate, 100) * 2 * args.seconds) + 1000))
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
            for f in files:
                f.unlink()
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    patterns = {label: re.compile(pattern) for label, pattern in GROUPS.items()}
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = set(stack.split(";"))
        for name in {f.split(" (")[0] for f in frames}:
            inclusive[name] += n
        for label, pattern in patterns.items():
            if any(pattern.search(f) for f in frames):
                groups[label] += n
    wrapped = "; the events ran out and were reused (dedup hits)" if res.wrapped else ""
    print(f"load: {res.rps:.0f} req/s at {args.connections} connections, {res.failures} failures{wrapped}, "
          f"serve CPU {res.server_cpu_pct:.0f}% of a core")  # fmt: skip
    print(f"py-spy --gil samples: {total}; collapsed stacks: {out}\n")
    print(
        c.table(
            ["component (inclusive)", "% of GIL-held samples"],
            [[k, f"{groups[k] / total * 100:.1f}"] for k in GROUPS],
        )
    )
    print()
    print(c.table(["frame (inclusive)", "%"], [[k, f"{v / total * 100:.1f}"] for k, v in inclusive.most_common(40)]))


if __name__ == "__main__":
    main()
