"""`serve` raises its soft open-files limit to hold its HTTP, provider and database connections."""

from __future__ import annotations

import resource
import subprocess
import sys

PROBE = (
    "import resource; from sidecar.process import _open_files_limit; _open_files_limit({needed}); "
    "print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
)


def limits_after(soft: int, hard: int, needed: int) -> tuple[int, int]:
    """In a child started with (soft, hard) open files: the limits after _open_files_limit(needed)."""

    def start_low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run([sys.executable, "-c", PROBE.format(needed=needed)], preexec_fn=start_low,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    got_soft, got_hard = (int(x) for x in out.split())
    return got_soft, got_hard


def test_a_low_soft_limit_is_raised_to_what_the_process_needs() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 2048, hard
    assert limits_after(256, 2048, 1268) == (1268, 2048)


def test_the_hard_limit_caps_it_and_a_higher_soft_limit_stays() -> None:
    assert limits_after(256, 1024, 1268) == (1024, 1024)
    assert limits_after(1500, 2048, 1268) == (1500, 2048)
