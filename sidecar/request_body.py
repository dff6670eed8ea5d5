"""Reading what a client POSTs: a body bounded in size, and JSON without Python's extensions."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

__all__ = ["read_limited", "strict_json"]


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None once it is past `limit` bytes (declared or sent), reading no further."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(body: bytes) -> Any:
    """json.loads refusing NaN and Infinity; raises ValueError, or RecursionError for nesting deeper
    than Python parses."""
    return json.loads(body, parse_constant=_not_json)
