"""A throwaway local PostgreSQL cluster, for `sms-sidecar dev` and the test suite.

It runs the distribution's server binaries directly (no Docker). `initdb` and `pg_ctl` refuse to
run as root, so as root the data directory is handed to the `postgres` OS user and the commands
run through `runuser`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.errors import SidecarError

__all__ = ["LocalCluster", "PostgresNotFound", "find_bindir"]

SUPERUSER = "supabase_admin"


class PostgresNotFound(SidecarError, RuntimeError):
    """No PostgreSQL server binaries were found."""


# Homebrew's postgresql@15 is keg-only: its binaries are under <prefix>/opt/postgresql@15/bin, not on PATH.
HOMEBREW_PREFIXES = (Path("/opt/homebrew"), Path("/usr/local"))


def find_bindir(
    preferred_major: int = 15,
    search_root: Path = Path("/usr/lib/postgresql"),
    path: str | None = None,
    homebrew_prefixes: tuple[Path, ...] = HOMEBREW_PREFIXES,
) -> Path:
    """Where `initdb` lives, first found of: PATH; `pg_config --bindir`; Debian's versioned directories
    (15 preferred, else the newest); Homebrew's keg-only ``postgresql@15`` (then ``postgresql``)."""
    on_path = shutil.which("initdb", path=path)
    if on_path:
        return Path(on_path).resolve().parent
    from_pg_config = _pg_config_bindir(path)
    if from_pg_config is not None and (from_pg_config / "initdb").is_file():
        return from_pg_config
    candidates = sorted(
        search_root.glob("*/bin/initdb"),
        key=lambda p: (p.parent.parent.name != str(preferred_major), -_major(p)),
    )
    if candidates:
        return candidates[0].parent
    for keg in (f"postgresql@{preferred_major}", "postgresql"):
        for prefix in homebrew_prefixes:
            if (prefix / "opt" / keg / "bin" / "initdb").is_file():
                return prefix / "opt" / keg / "bin"
    raise PostgresNotFound(
        "no PostgreSQL server binaries found (initdb is not on PATH, under `pg_config --bindir`, in "
        "/usr/lib/postgresql/*/bin nor in Homebrew's opt/postgresql@15/bin); install them, e.g. "
        "`sudo apt-get install postgresql-15` on Debian/Ubuntu or `brew install postgresql@15` on macOS, "
        "or set DATABASE_URL"
    )


def _pg_config_bindir(path: str | None) -> Path | None:
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is None:
        return None
    try:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(result.stdout.strip()) if result.stdout.strip() else None


def _major(initdb: Path) -> int:
    name = initdb.parent.parent.name
    return int(name) if name.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """A cluster in a temporary directory, listening on 127.0.0.1 only, trusting local connections."""

    bindir: Path = field(default_factory=find_bindir)
    port: int = field(default_factory=_free_port)
    datadir: Path | None = None
    _owner: pwd.struct_passwd | None = None

    def start(self) -> LocalCluster:
        self._tmp = Path(tempfile.mkdtemp(prefix="sms-sidecar-pg-"))
        self.datadir = self._tmp / "data"
        self.datadir.mkdir()
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresNotFound("running as root, but there is no `postgres` OS user to run initdb as") from exc
            os.chown(self._tmp, self._owner.pw_uid, self._owner.pw_gid)
            os.chown(self.datadir, self._owner.pw_uid, self._owner.pw_gid)
        self._run(
            "initdb", "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        self._pg_ctl_start()
        return self

    def stop(self) -> None:
        if self.datadir is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass  # already down; the directory still has to go
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.datadir = None

    def crash(self) -> None:
        """Stop at once, as a crash would; `start_again` brings it back on the same port."""
        assert self.datadir is not None
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def start_again(self) -> None:
        self._pg_ctl_start()

    def _pg_ctl_start(self) -> None:
        # No fsync: a throwaway cluster need not survive the machine crashing, only its own processes
        # (synchronous_commit stays on, so a committed row survives `crash`).
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self._tmp} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "-l", str(self._tmp / "log"), "-o", options, "start")

    def url(self, user: str = SUPERUSER, dbname: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._owner is not None:
            cmd = ["runuser", "-u", self._owner.pw_name, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if result.returncode != 0:
            log = self._tmp / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{tail}".strip())
