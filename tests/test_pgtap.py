"""Runs the pgTAP suite in supabase/tests/database (what `supabase test db` runs) through psql."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from sidecar.localpg import PostgresNotFound, find_bindir
from tests.support.database import Database

SUITE = sorted((Path(__file__).resolve().parent.parent / "supabase" / "tests" / "database").glob("*.sql"))


def _psql() -> str:
    try:
        return str(find_bindir() / "psql")
    except PostgresNotFound:
        found = shutil.which("psql")
        if not found:
            pytest.fail("psql is needed to run the pgTAP suite")
        return found


@pytest.fixture(scope="module")
def pgtap(database: Database) -> Database:
    url = database.superuser_url or database.url
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create extension if not exists pgtap with schema extensions")
    except psycopg.Error as exc:
        reason = (
            "pgTAP is not installed on the test server: sudo apt-get install postgresql-15-pgtap "
            f"(macOS: brew install pgtap) ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        )
        # CI sets REQUIRE_PGTAP=1 (.ci/run): there a missing pgTAP is a failure, not a skip.
        if os.environ.get("REQUIRE_PGTAP") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return database


def test_the_suite_exists() -> None:
    assert len(SUITE) >= 2


@pytest.mark.parametrize("path", SUITE, ids=[p.name for p in SUITE])
def test_pgtap_file(pgtap: Database, path: Path) -> None:
    result = subprocess.run(
        [_psql(), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", pgtap.url, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout
    assert result.returncode == 0, result.stderr + output
    plan = re.search(r"^1\.\.(\d+)$", output, re.M)
    assert plan, output
    oks = re.findall(r"^ok \d+", output, re.M)
    failures = re.findall(r"^not ok .*$", output, re.M)
    assert not failures, output
    assert len(oks) == int(plan.group(1)), output
