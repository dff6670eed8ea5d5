"""The errors the sidecar raises on purpose, under one base the command line catches once.

SidecarError
 ├── ConfigError (config.py)            a setting is missing or malformed (also a ValueError)
 ├── DatabaseUnavailable                the database did not answer (down, pool exhausted, timeout)
 ├── MigrationError (migrate.py)        a migration failed (also a RuntimeError)
 ├── PostgresNotFound (localpg.py)      `dev` found no PostgreSQL binaries (also a RuntimeError)
 ├── ProviderError (providers/errors)   a provider could not be asked; its text is safe to show
 ├── GrpcBindError (grpc_api/server)    the gRPC address cannot be listened on (also an OSError)
 └── CommandFailed                      a command stops, with the line to print
"""

from __future__ import annotations

__all__ = ["CommandFailed", "DatabaseUnavailable", "SidecarError", "failure_name"]


class SidecarError(Exception):
    """Base of the sidecar's own errors; `sms-sidecar` prints one as one line and exits."""

    exit_code = 1

    def line(self, command: str) -> str:
        """The one line `sms-sidecar <command>` prints for it."""
        return f"sms-sidecar {command}: {self}"


class DatabaseUnavailable(SidecarError):
    """The database did not answer: down, restarting, pool exhausted or statement timeout. Worth retrying."""


class CommandFailed(SidecarError):
    """A command cannot go on; the message is the whole line, naming the command."""

    def __init__(self, line: str, exit_code: int = 1) -> None:
        super().__init__(line)
        self.exit_code = exit_code

    def line(self, command: str) -> str:
        return str(self)


def failure_name(exc: BaseException) -> str:
    """The class of what failed, for logs and /readyz: through DatabaseUnavailable, the driver's error."""
    cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else None
    return type(cause or exc).__name__
