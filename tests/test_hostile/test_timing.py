"""Hostile input: timing."""

from __future__ import annotations

import re
import statistics

import psycopg

from tests.support.database import Database

# --------------------------------------------------------------------------------------------------
# Timing


def test_codes_are_compared_in_constant_time(database: Database) -> None:
    check = database.one("select pg_get_functiondef('sms._check_code(text, text, text, text)'::regprocedure)")
    compact = re.sub(r"\s+", " ", check)
    assert "sms._constant_time_equal(sms._hash_code(c.id, p_code), c.code_hash)" in compact
    assert not re.search(r"code_hash\s*(=|<>|!=)|(=|<>|!=)\s*c\.code_hash", check), "a direct comparison of hashes"
    for wrapper in ("sms.verify_code(text, text, text)", "sms.grpc_verify_code(text, text)"):
        assert "sms._check_code(" in database.one("select pg_get_functiondef(%s::regprocedure)", [wrapper])
    equal = database.one("select pg_get_functiondef('sms._constant_time_equal(bytea, bytea)'::regprocedure)").lower()
    body = equal.split("begin", 1)[1]
    assert "exit" not in body and body.count("return") == 1, "the comparison stops early"

    # It is right ...
    cases = {
        ("\\x0102", "\\x0102"): True,
        ("\\x0102", "\\x0103"): False,
        ("\\x0102", "\\x0202"): False,
        ("\\x0102", "\\x010203"): False,
        ("\\x", "\\x"): True,
        ("\\x", "\\x00"): False,
    }
    for (a, b), expected in cases.items():
        assert database.one("select sms._constant_time_equal(%s::bytea, %s::bytea)", [a, b]) is expected

    # ... and takes as long for a difference in the first byte as in the last (a smoke check, measured
    # inside the server to keep the network and the client's scheduling out of it).
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute(
            "create function pg_temp.time_equal(a bytea, b bytea, n integer) returns float8 language plpgsql as $$"
            " declare t0 timestamptz := clock_timestamp(); r boolean;"
            " begin for i in 1 .. n loop r := sms._constant_time_equal(a, b); end loop;"
            " return extract(epoch from clock_timestamp() - t0); end $$"
        )
        hashes = conn.execute("select extensions.hmac('x', 'k', 'sha256')").fetchone()
        assert hashes is not None
        real = bytes(hashes[0])
        first = bytes([real[0] ^ 1]) + real[1:]
        last = real[:-1] + bytes([real[-1] ^ 1])
        timings: dict[str, list[float]] = {"first": [], "last": []}
        for i in range(15):
            order = [("first", first), ("last", last)] if i % 2 else [("last", last), ("first", first)]
            for name, other in order:
                row = conn.execute("select pg_temp.time_equal(%s, %s, 3000)", [real, other]).fetchone()
                assert row is not None
                timings[name].append(row[0])
    ratio = statistics.median(timings["first"]) / statistics.median(timings["last"])
    # An early exit at the first differing byte measures about 0.15 here.
    assert 0.5 < ratio < 2.0, (ratio, timings)
