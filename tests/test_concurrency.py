"""Real concurrency on verify: many connections at once, each its own PostgREST-style transaction."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.support.codes import queued_code, request, verify, wrong
from tests.support.database import Database
from tests.support.postgrest import PostgREST, user


def all_at_once(n: int, call: Callable[[], Any]) -> list[Any]:
    """Start n calls behind a barrier so they hit the database together."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_one_code_verified_by_many_at_once_succeeds_exactly_once(
    api: PostgREST, database: Database, phone: str
) -> None:
    caller = user()
    code = queued_code(database, request(api, phone, caller)["request_id"])
    results = all_at_once(24, lambda: verify(api, phone, code, caller))
    assert Counter(r["valid"] for r in results) == {True: 1, False: 23}
    assert all(r["reason"] == "not_found" for r in results if not r["valid"])


def test_parallel_wrong_guesses_count_at_most_max_attempts(api: PostgREST, database: Database, phone: str) -> None:
    caller = user()
    code = queued_code(database, request(api, phone, caller)["request_id"])
    results = all_at_once(24, lambda: verify(api, phone, wrong(code), caller))
    reasons = Counter(r["reason"] for r in results)
    assert reasons == {"mismatch": 2, "too_many_attempts": 22}
    assert sorted(r["attempts_left"] for r in results if r["reason"] == "mismatch") == [1, 2]
    assert database.one("select attempts from sms.codes where phone = %s", [phone]) == 3
    assert verify(api, phone, code, caller)["reason"] == "too_many_attempts"


def test_guessing_while_the_owner_verifies_never_yields_two_successes(
    api: PostgREST, database: Database, phone: str
) -> None:
    caller = user()
    code = queued_code(database, request(api, phone, caller)["request_id"])
    guesses = [code if i % 4 == 0 else wrong(code) for i in range(16)]
    it = iter(guesses)
    lock = threading.Lock()

    def next_guess() -> dict[str, Any]:
        with lock:
            guess = next(it)
        return verify(api, phone, guess, caller)

    results = all_at_once(16, next_guess)
    assert sum(r["valid"] for r in results) <= 1
    assert database.one("select attempts from sms.codes where phone = %s", [phone]) <= 3
