"""Benchmark 2: public.verify_phone_code and public.request_phone_code through pgbench.

    .venv/bin/python bench/verify.py [--quick]

pgbench connects as `authenticator` (PostgREST's login role) and runs, per transaction, what
PostgREST does for `supabase.rpc(...)`: begin; set local role authenticated; set request.jwt.claims,
request.headers, request.method, request.path; call the function; commit. Baselines on the same
cluster: a bare `select 1`, and `select 1` wrapped in the same PostgREST transaction.

Verification data: N phones, each with an outstanding code bound to its own user, inserted
directly (known codes); each transaction picks a random phone and sends the right code one time in
four, else a wrong one (3 wrong codes invalidate a code, so N is large and the codes are re-armed
after every run). Clients 1, 8, 32 (pgbench -j 2), -M prepared.

Target: verify TPS >= 50% of `select 1` TPS at 8 clients.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import _common as c

CLIENTS = (1, 8, 32)
TARGET = 0.50


def setup(fn: str) -> str:
    return "\\set n random(1, :nphones)\n\\set ok random(1, 4)\n" + c.postgrest_transaction(fn, "n")


SCRIPTS = {
    "select 1": "select 1;\n",
    "select 1 in PostgREST txn": setup("noop") + "select 1;\ncommit;\n",
    "verify_phone_code": setup("verify_phone_code")
    + "select public.verify_phone_code(phone => '+8613' || lpad(:n::text, 9, '0'),"
    " code => case when :ok = 1 then lpad((:n * 7919 % 1000000)::text, 6, '0') else '000000' end);\ncommit;\n",
    "request_phone_code": setup("request_phone_code") + "\\set p random(0, 999999999)\n"
    "select public.request_phone_code(phone => '+8615' || lpad(:p::text, 9, '0'));\ncommit;\n",
}


def seed_codes(db: c.BenchDatabase, phones: int) -> None:
    """One outstanding code per phone 8613000000001.., bound to user md5('u'||n)::uuid, code known."""
    db.execute(
        "insert into sms.codes (id, phone, purpose, owner, user_id, code_hash, expires_at)"
        " select s.id, '8613' || lpad(s.g::text, 9, '0'), 'default', 'user:' || s.uid, s.uid,"
        "        sms._hash_code(s.id, lpad((s.g * 7919 %% 1000000)::text, 6, '0')), now() + interval '1 day'"
        " from (select g, gen_random_uuid() as id, md5('u' || g)::uuid as uid from generate_series(1, %s) as g) as s",
        [phones],
        superuser=True,
    )
    db.vacuum()


def outcome_mix(db: c.BenchDatabase) -> tuple[int, int, int]:
    """(valid, wrong codes counted, codes invalidated) since the last re-arm."""
    row = db.one(
        "select count(*) filter (where consumed_at is not null), coalesce(sum(attempts), 0),"
        " count(*) filter (where invalidated_reason = 'too_many_attempts') from sms.codes where phone like '8613%'",
        superuser=True,
    )
    return int(row[0]), int(row[1]), int(row[2])


def rearm(db: c.BenchDatabase) -> None:
    db.execute(
        "update sms.codes set attempts = 0, consumed_at = null, invalidated_at = null, invalidated_reason = null"
        " where phone like '8613%' and (attempts > 0 or consumed_at is not null or invalidated_at is not null)",
        superuser=True,
    )
    db.execute("vacuum sms.codes", superuser=True)


def pgbench(db: c.BenchDatabase, script: Path, clients: int, seconds: int, phones: int) -> tuple[float, float, int]:
    """TPS, average latency (ms) and failed transactions of one pgbench run against `db`."""
    argv = [
        str(c.LocalCluster().bindir / "pgbench"),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(seconds),
        "-D",
        f"nphones={phones}",
        "-f",
        str(script),
        "-h",
        "127.0.0.1",
        "-p",
        str(db.port),
        "-U",
        "authenticator",
        db.dbname,
    ]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out.stderr}\n{out.stdout}")
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout)[1])  # type: ignore[index]
    lat = float(re.search(r"latency average = ([\d.]+) ms", out.stdout)[1])  # type: ignore[index]
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    return tps, lat, int(failed[1]) if failed else 0


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    facts = c.facts_block()
    rounds, seconds, phones = (1, 2, 20_000) if args.quick else (3, 5, 200_000)
    tps: dict[tuple[str, int], list[float]] = {}
    lat: dict[tuple[str, int], list[float]] = {}
    mix = [0, 0, 0, 0]  # valid, wrong counted, invalidated, transactions
    failures = 0
    with c.database() as db, tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        seed_codes(db, phones)
        files = {}
        for i, (name, text) in enumerate(SCRIPTS.items()):
            files[name] = Path(tmp) / f"script{i}.sql"
            files[name].write_text(text)
        names = list(SCRIPTS)
        for clients in CLIENTS:
            for r in range(rounds):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:  # rotate the order each round
                    t, latency, failed = pgbench(db, files[name], clients, seconds, phones)
                    failures += failed
                    tps.setdefault((name, clients), []).append(t)
                    lat.setdefault((name, clients), []).append(latency)
                    if name == "verify_phone_code":
                        valid, wrong, invalidated = outcome_mix(db)
                        mix = [mix[0] + valid, mix[1] + wrong, mix[2] + invalidated, mix[3] + int(t * seconds)]
                        rearm(db)
                    c.log(f"{name:27s} c={clients:2d} round {r + 1}: {t:9.0f} tps, {latency:.3f} ms avg")
        outbox = db.one("select count(*) from sms.outbox")

    rows = []
    for clients in CLIENTS:
        base = tps[("select 1", clients)]
        row: list[object] = [clients]
        for name in names:
            row.append(c.spread(tps[(name, clients)], 0))
        for name in ("verify_phone_code", "request_phone_code"):
            ratios = [v / b * 100 for v, b in zip(tps[(name, clients)], base, strict=True)]
            row.append(c.spread(ratios, 1))
        wrapped = tps[("select 1 in PostgREST txn", clients)]
        row.append(
            c.spread([v / w * 100 for v, w in zip(tps[("verify_phone_code", clients)], wrapped, strict=True)], 0)
        )
        row.append(f"{c.median(lat[('verify_phone_code', clients)]):.2f}")
        rows.append(row)
    headers = [
        "clients",
        *[f"{n} TPS" for n in names],
        "verify % of select 1",
        "request % of select 1",
        "verify % of wrapped select 1",
        "verify latency avg ms",
    ]
    ratio8 = c.median([v / b for v, b in zip(tps[("verify_phone_code", 8)], tps[("select 1", 8)], strict=True)])
    targets = [
        [
            "verify TPS >= 50% of select 1 TPS at 8 clients",
            f"{ratio8 * 100:.1f}%",
            c.verdict(ratio8 * 100, TARGET * 100, higher_is_better=True, unit=" points"),
        ],
    ]
    valid, wrong, invalidated, total = mix
    checks = (
        f"Verify outcome mix over all verify runs (~{total:,} calls): {valid:,} valid, {wrong:,} wrong codes "
        f"counted, {invalidated:,} codes invalidated after 3 wrong tries; the rest (~{max(total - valid - wrong, 0):,})"
        f" answered not_found/too_many_attempts for an already used code. pgbench failed transactions: {failures}. "
        f"request_phone_code queued {outbox:,} outbox rows (no worker running)."
    )
    c.report(
        "verify", "2. Verification codes in SQL (`bench/verify.py`)", facts,
        [
            f"Rounds: {rounds} x {seconds} s per point; {phones:,} seeded phones; pgbench -M prepared -j 2 as "
            "`authenticator`; median (min–max) over rounds.",
            c.table(headers, rows),
            c.table(["target", "measured", "verdict"], targets),
            checks,
        ],
        write=not args.quick and not args.no_write,
    )  # fmt: skip


if __name__ == "__main__":
    main()
