"""Shared plumbing for the benchmarks in bench/: a throwaway database, the fake Aliyun, real
`sms-sidecar serve` processes, the wrk load generator, statistics and tables.

Nothing here changes the project: the database is a fresh local cluster per run, the sidecar is the
installed `sms-sidecar` console script, the fake is tests/support/fake_aliyun.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import http.client
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psycopg

# The repository root is on the import path through the editable install (`pip install -e .`), so the test
# support package imports like the sidecar does.
from sidecar import standin
from sidecar.localpg import LocalCluster as LocalCluster, PostgresNotFound
from sidecar.migrate import migrate
from tests.support.fake_aliyun import FakeAliyun as FakeAliyun
from tests.support.gotrue import go_json, make_metadata, make_user, otp_login, sign

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

if TYPE_CHECKING:
    from sidecar.providers.aliyun import AliyunProvider

AK, AK_SECRET = "LTAI-bench-key", "bench-key-secret"
SIGN_NAME, TEMPLATE = "阿里云短信测试", "SMS_154950909"
HOOK_SECRET = "v1,whsec_" + base64.b64encode(b"supabase-aliyun-sms-bench-secret").decode()
SIDECAR_PASSWORD = "bench-sidecar-password"
GOTRUE_VERSION = (2, 196, 0)  # sends metadata.uuid, so every event has its own dedup key
SERVE = Path(sys.executable).parent / "sms-sidecar"  # the console script of the venv running the bench
PYTHON = sys.executable
RESULTS = BENCH / "RESULTS.md"
LUA = BENCH / "wrk_hook.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- command line -------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short smoke run (one round, short durations)")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md after a full run")
    return p


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- machine ------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])  # type: ignore[index]
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, TypeError):
        pass
    pg = subprocess.run([str(LocalCluster().bindir / "postgres"), "--version"], capture_output=True, text=True)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": pg.stdout.strip(),
        "loadavg at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


# --- statistics and tables ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def fmt(value: float, digits: int = 1) -> str:
    if value != value:  # NaN
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def spread(values: Sequence[float], digits: int = 1) -> str:
    """`median (min–max)` of the rounds."""
    if not values:
        return "–"
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def verdict(value: float, target: float, *, higher_is_better: bool, unit: str = "") -> str:
    met = value >= target if higher_is_better else value <= target
    if met:
        return "MET"
    gap = target - value if higher_is_better else value - target
    rel = abs(gap) / target * 100 if target else float("inf")
    word = "short by" if higher_is_better else "over by"
    return f"NOT MET ({word} {fmt(abs(gap), 2)}{unit}, {rel:.0f}%)"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, readable as plain text too."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(name: str, body: str) -> None:
    """Replace this benchmark's section of bench/RESULTS.md (kept between markers), newest facts on top."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        marker = "\n## Findings"
        if marker in text:
            i = text.index(marker)
            text = text[:i].rstrip() + "\n\n" + block + "\n" + text[i:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    log(f"updated {RESULTS.relative_to(ROOT)} section {name!r}")


def postgrest_transaction(fn: str, user: str) -> str:
    """A pgbench script's opening of one PostgREST RPC transaction: role, the JWT of the user
    md5('u' || :<user>) and a client address derived from it, as PostgREST sets them."""
    return f"""begin;
set local role authenticated;
select set_config('request.jwt.claims', json_build_object('role', 'authenticated', 'aud', 'authenticated',
       'sub', md5('u' || :{user})::uuid)::text, true),
       set_config('request.headers',
                  json_build_object('x-real-ip',
                                    '198.18.' || (:{user} % 256) || '.' || (:{user} / 256 % 254 + 1))::text, true),
       set_config('request.method', 'POST', true),
       set_config('request.path', '/rpc/{fn}', true);
"""


def report(name: str, title: str, facts: str, parts: Sequence[str], *, write: bool) -> None:
    """Print a benchmark's tables; with `write` (a full run), also make them its RESULTS.md section."""
    text = "\n\n".join(parts)
    print(text)
    if write:
        write_results(name, f"## {title}\n\n{facts}\n\n{text}")


def facts_block(extra: dict[str, str] | None = None) -> str:
    facts = {**machine_facts(), **(extra or {})}
    return "\n".join(f"- {k}: {v}" for k, v in facts.items())


# --- processes ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu_seconds(cluster: LocalCluster) -> float:
    """CPU time of one cluster: the postmaster, its live children and (cutime/cstime) its exited ones."""
    assert cluster.datadir is not None
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15])
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            f = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[1]) == postmaster:
            total += int(f[11]) + int(f[12])
    return total / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def status_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """A child process serving HTTP on a loopback port, ready when `ready_path` answers `ready_status`."""

    ready_path = "/readyz"
    ready_status = 200

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.port = free_port()
        self.argv = argv
        self.env = {**os.environ, **env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile: IO[bytes] = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = float("nan")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> Server:
        started = time.monotonic()
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            try:
                if http_get(self.port, self.ready_path, timeout=0.5)[0] == self.ready_status:
                    self.startup_seconds = time.monotonic() - started
                    return self
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} not ready in {timeout} s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.logfile.close()

    def output(self) -> str:
        return Path(self.logfile.name).read_text(errors="replace")

    def log_lines(self) -> int:
        return sum(1 for _ in open(self.logfile.name, "rb"))

    def cleanup(self) -> None:
        self.stop()
        path = Path(self.logfile.name)
        # Only our own temporary log: a caller may have pointed it at /dev/null, which root could delete.
        if path.is_file() and path.parent == Path(tempfile.gettempdir()):
            path.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def sidecar_env(db: BenchDatabase, fake: FakeAliyun, **extra: str) -> dict[str, str]:
    """The environment of a production-like `sms-sidecar serve`: Aliyun provider, pointed at the fake."""
    return {
        "DATABASE_URL": db.sidecar_url,
        "SEND_SMS_HOOK_SECRETS": HOOK_SECRET,
        "SMS_PROVIDER": "aliyun",
        "ALIYUN_ACCESS_KEY_ID": AK,
        "ALIYUN_ACCESS_KEY_SECRET": AK_SECRET,
        "ALIYUN_SMS_SIGN_NAME": SIGN_NAME,
        "ALIYUN_SMS_TEMPLATE_CODE": TEMPLATE,
        "ALIYUN_SMS_ENDPOINT": fake.url,
        **extra,
    }


def sidecar_code() -> str:
    """Which code `sms-sidecar serve` runs (this checkout or a copy installed elsewhere), and whether it
    is the checkout's HEAD."""
    probe = [str(SERVE.parent / "python"), "-P", "-c", "import sidecar; print(sidecar.__file__)"]
    where = Path(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()).parent
    git = ["git", "-C", str(ROOT), "--work-tree", str(where.parent)]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no opportunistic index refresh
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, env=env).stdout
    same = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "sidecar"], env=env).returncode == 0
    place = "this checkout" if where == ROOT / "sidecar" else f"the copy in {where}"
    return f"{place}, {'same as' if same else 'differs from'} sidecar/ of HEAD {rev.strip()}"


def sidecar(db: BenchDatabase, fake: FakeAliyun, name: str = "sidecar", **extra: str) -> Server:
    """`sms-sidecar serve` as a real child process (the installed console script)."""
    return Server([str(SERVE), "serve"], sidecar_env(db, fake, **extra), name)


# --- the Deno edge function this project replaces ------------------------------------------------------

DENO_VERSION = "2.9.6"
DENO_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sms-sidecar-bench" / "deno"
DENO_DIR = DENO_HOME / "dir"  # Deno's own cache: the npm package standardwebhooks that index.ts imports
DENO_SRC = BENCH / "deno"
# No deno.json, no lockfile; import_map.json resolves index.ts's esm.sh import to the same npm package.
DENO_FLAGS = ["--no-config", "--no-lock", "--import-map", str(DENO_SRC / "import_map.json")]


def deno_binary() -> Path:
    """The Deno CLI from npm (`deno@DENO_VERSION` in DENO_HOME), and index.ts's one import cached;
    installed on first use, so that runs download nothing."""
    found = sorted(DENO_HOME.glob("node_modules/@deno/linux-*/deno"))  # the binary itself, not npm's shim
    if not found:
        log(f"installing deno {DENO_VERSION} from npm into {DENO_HOME}")
        DENO_HOME.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(DENO_HOME), "--no-audit", "--no-fund", "--save-exact",
             f"deno@{DENO_VERSION}"], check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        found = sorted(DENO_HOME.glob("node_modules/@deno/linux-*/deno"))
        if not found:
            raise SystemExit(f"npm installed no Deno binary for this platform under {DENO_HOME}")
    exe = found[0]
    if not (DENO_DIR / "npm" / "registry.npmjs.org" / "standardwebhooks").is_dir():
        subprocess.run([str(exe), "cache", *DENO_FLAGS, str(DENO_SRC / "serve.ts")], check=True,
                       env={**os.environ, "DENO_DIR": str(DENO_DIR)})  # fmt: skip
    return exe


class DenoServer(Server):
    ready_path = "/"
    ready_status = 401  # index.ts's answer to an unsigned request: it is up and verifying


def deno_server(fake: FakeAliyun) -> Server:
    """bookshiyi/supabase-aliyun-sms-sender's index.ts (bench/deno/) under `deno run`, pointed at the fake
    by bench/deno/serve.ts, configured as its README says (same credentials and hook secret as ours)."""
    exe = deno_binary()
    env = {
        "DENO_DIR": str(DENO_DIR),
        "NO_COLOR": "1",
        "BENCH_ALIYUN_URL": fake.url + "/",
        "ALIYUN_ACCESS_KEY_ID": AK,
        "ALIYUN_ACCESS_KEY_SECRET": AK_SECRET,
        "ALIYUN_SMS_SIGN_NAME": SIGN_NAME,
        "ALIYUN_SMS_TEMPLATE_CODE": TEMPLATE,
        "SEND_SMS_HOOK_SECRET": HOOK_SECRET,
    }
    argv = [str(exe), "run", *DENO_FLAGS, "--cached-only", "--allow-net=127.0.0.1", "--allow-env",
            str(DENO_SRC / "serve.ts")]  # fmt: skip
    return DenoServer(argv, env, "deno")


def floor_server() -> Server:
    """bench/floor_app.py: a bare Starlette endpoint returning {} under the sidecar's uvicorn settings."""
    return Server([PYTHON, str(BENCH / "floor_app.py")], {}, "floor")


# --- database -----------------------------------------------------------------------------------------


@dataclass
class BenchDatabase:
    cluster: LocalCluster
    url: str  # the `postgres` role, owner of what the migrations create
    superuser_url: str
    sidecar_url: str  # sms_sidecar with a login, as an operator sets it up
    authenticator_url: str  # what PostgREST connects as
    dbname: str = "postgres"

    def execute(self, query: Any, params: Any = None, *, superuser: bool = False) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.superuser_url if superuser else self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def one(self, query: Any, params: Any = None, *, superuser: bool = False) -> Any:
        rows = self.execute(query, params, superuser=superuser)
        return rows[0][0] if rows and len(rows[0]) == 1 else (rows[0] if rows else None)

    def disable_limits(self) -> None:
        self.execute(
            "update sms.settings set resend_cooldown_seconds = null, daily_limit_per_phone = null,"
            " hourly_limit_per_user = null, hourly_limit_per_ip = null where id"
        )

    def vacuum(self) -> None:
        self.execute("vacuum analyze sms.outbox, sms.deliveries, sms.codes", superuser=True)

    @property
    def port(self) -> int:
        return self.cluster.port


@contextmanager
def database(settings: dict[str, str] | None = None) -> Iterator[BenchDatabase]:
    """A throwaway local cluster, loaded with the Supabase stand-in and migrated, limits off."""
    started = time.monotonic()
    cluster = LocalCluster()
    for attempt in (1, 2):
        try:
            cluster.start()
            break
        except PostgresNotFound:  # no server binaries: a second try would not find them either
            raise
        except RuntimeError as exc:  # LocalCluster's initdb/pg_ctl failure: say why, and try once more (a busy machine)
            log(f"starting the cluster failed: {exc}")
            cluster.stop()
            if attempt == 2:
                raise
            cluster = LocalCluster()
    try:
        standin.load(cluster.url())
        migrate(cluster.url("postgres"))
        info = psycopg.conninfo.conninfo_to_dict(cluster.url("postgres"))
        info.update(user="sms_sidecar", password=SIDECAR_PASSWORD)
        db = BenchDatabase(
            cluster=cluster,
            url=cluster.url("postgres"),
            superuser_url=cluster.url(),
            sidecar_url=psycopg.conninfo.make_conninfo(**info),  # type: ignore[arg-type]
            authenticator_url=cluster.url("authenticator"),
        )
        db.execute(f"alter role sms_sidecar with login password '{SIDECAR_PASSWORD}'")
        for name, value in (settings or {}).items():
            db.execute(f"alter system set {name} = '{value}'", superuser=True)
        if settings:
            db.execute("select pg_reload_conf()", superuser=True)
        db.disable_limits()
        log(f"database ready on port {cluster.port} in {time.monotonic() - started:.1f} s")
        yield db
    finally:
        cluster.stop()


# --- the fake Aliyun ----------------------------------------------------------------------------------


class BenchFake(FakeAliyun):
    """tests/support/fake_aliyun.FakeAliyun that counts requests instead of keeping them (`captured`
    would hold every raw request of a long run). Signatures, timestamps, parameters and answers are checked
    exactly as in the original, whose nonce pruning now stays flat under load (a bench finding).
    """

    def _on_request(self, raw: Any) -> None:
        with self._lock:
            self._requests_seen += 1


def fake_aliyun() -> FakeAliyun:
    # Only the counting fake: the comparison with the recording one measured the nonce pruning, now in the fake.
    return BenchFake(credentials={AK: AK_SECRET}).start()


# --- the sidecar's provider, in this process ----------------------------------------------------------

SEND_TIMEOUT = 10.0  # seconds for one send, the whole call (the provider's `timeout`)


def event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind `sms-sidecar serve` runs: uvloop where installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def aliyun_provider(endpoint: str, max_connections: int = 256) -> AliyunProvider:
    """The sidecar's Aliyun provider, over plain HTTP to the fake at `endpoint`; not started yet."""
    from sidecar.config import AliyunConfig
    from sidecar.providers.aliyun import AliyunProvider

    config = AliyunConfig(access_key_id=AK, access_key_secret=AK_SECRET, sign_name=SIGN_NAME, template_code=TEMPLATE,
                          endpoint=endpoint, protocol="http")  # fmt: skip
    return AliyunProvider(config, max_connections=max_connections)


# --- GoTrue hook requests -----------------------------------------------------------------------------


@dataclass
class HookRequests:
    """Pre-generated, pre-signed GoTrue v2.196 Send SMS events, one per line for the wrk script:
    webhook-id TAB webhook-timestamp TAB webhook-signature TAB body."""

    path: Path
    count: int
    phones: list[str] = field(default_factory=list)

    def unlink(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


_phone_seq = iter(range(10**9))
_phone_base = random.randrange(10**8)


def next_phone() -> str:
    """A mainland mobile number never used before in this process."""
    n = (_phone_base + next(_phone_seq)) % 10**9
    return "8613" + f"{n:09d}"


def hook_event(phone: str | None = None) -> dict[str, Any]:
    """A GoTrue v2.196 Send SMS event for a new phone (by default), user, metadata.uuid and client address
    (so never a dedup hit, and per-IP advisory locks do not serialise them)."""
    phone = phone or next_phone()
    ip = f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"
    return otp_login(
        GOTRUE_VERSION,
        phone=phone,
        otp=f"{random.randrange(10**6):06d}",
        user=make_user(phone=phone),
        metadata=make_metadata(ip_address=ip),
    )


def make_hook_requests(count: int, *, secret: str = HOOK_SECRET) -> HookRequests:
    """`count` distinct signed events (`hook_event`), signed now."""
    fd, name = tempfile.mkstemp(prefix="bench-hook-", suffix=".tsv")
    phones = []
    now = int(time.time())
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for _ in range(count):
            phone = next_phone()
            phones.append(phone)
            body = go_json(hook_event(phone))
            msg_id = str(uuid.uuid4())
            signature = sign([secret], msg_id, now, body)
            text = body.decode("utf-8")
            assert "\t" not in text and "\n" not in text
            out.write(f"{msg_id}\t{now}\t{signature}\t{text}\n")
    return HookRequests(Path(name), count, phones)


# --- wrk ----------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    bad: int  # non-200 or a body other than {} (a refused or failed hook)
    socket_errors: int
    wrapped: bool  # the request file ran out and was reused (would hit dedup)
    wrk_cpu_pct: float  # of one core, over the run
    server_cpu_pct: float  # of one core, over the run (the target process)
    machine_busy_pct: float  # of all cores, over the run (everything on the machine, other tenants too)
    server_cpu_ms_per_req: float = float("nan")
    db_cpu_ms_per_req: float = float("nan")  # the cluster's processes (when given), per completed request

    @property
    def failures(self) -> int:
        return self.bad + self.socket_errors

    @property
    def ok_rps(self) -> float:
        """Successful answers per second."""
        return max(self.requests - self.bad, 0) / self.seconds


def run_wrk(
    url: str,
    requests: HookRequests,
    connections: int,
    seconds: float,
    *,
    server_pid: int | None = None,
    threads: int = 1,
    on_tick: Callable[[], None] | None = None,
    cluster: LocalCluster | None = None,
    accept: str = "empty",
) -> WrkResult:
    """Closed-loop load with wrk: `connections` keep-alive connections, each cycling through its own
    share of `requests`. Returns throughput, latency percentiles and the CPU wrk itself used.
    `accept`: what counts as success, "empty" (200 `{}`) or "gotrue" (200 without an `error` member)."""
    env = {**os.environ, "BENCH_REQUESTS": str(requests.path), "BENCH_THREADS": str(threads),
           "BENCH_ACCEPT": accept}  # fmt: skip
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "10s", "-s", str(LUA), url]
    server_cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    busy0, total0 = machine_ticks()
    db0 = postgres_cpu_seconds(cluster) if cluster is not None else 0.0
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wrk_cpu = 0.0
    while proc.poll() is None:
        try:
            wrk_cpu = cpu_seconds(proc.pid)
        except (OSError, IndexError):
            pass
        if on_tick is not None:
            on_tick()
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.monotonic() - started
    server_cpu = (cpu_seconds(server_pid) - server_cpu0) if server_pid else 0.0
    busy1, total1 = machine_ticks()
    db_cpu = postgres_cpu_seconds(cluster) - db0 if cluster is not None else float("nan")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err}\n{out}")
    match = re.search(r"^BENCH_JSON (.*)$", out, re.M)
    if not match:
        raise RuntimeError(f"wrk printed no BENCH_JSON line:\n{out}\n{err}")
    data = json.loads(match[1])
    us = 1000.0
    return WrkResult(
        connections=connections,
        seconds=data["duration_us"] / 1e6,
        requests=data["requests"],
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50"] / us,
        p90_ms=data["p90"] / us,
        p99_ms=data["p99"] / us,
        max_ms=data["max"] / us,
        bad=data["bad"],
        socket_errors=data["errors"],
        wrapped=bool(data["wrapped"]),
        # wrk loads its script and file before it starts the clock: count the whole process.
        wrk_cpu_pct=wrk_cpu / wall * 100,
        server_cpu_pct=server_cpu / (data["duration_us"] / 1e6) * 100,
        machine_busy_pct=(busy1 - busy0) / max(total1 - total0, 1) * 100,
        server_cpu_ms_per_req=server_cpu * 1000 / max(data["requests"], 1),
        db_cpu_ms_per_req=db_cpu * 1000 / max(data["requests"], 1),
    )


def check_wrk() -> None:
    if subprocess.run(["which", "wrk"], capture_output=True).returncode != 0:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (Debian's package)")


class Sampler:
    """Samples a value every `interval` seconds in a thread (e.g. VmRSS); keeps the maximum."""

    def __init__(self, fn: Callable[[], float], interval: float = 0.1) -> None:
        self.fn = fn
        self.interval = interval
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.values.append(self.fn())
            except (OSError, KeyError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max(self.values) if self.values else float("nan")
