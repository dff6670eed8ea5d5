"""The framework floor for bench/hook.py: a bare Starlette endpoint that reads the body and answers
`{}`, served by uvicorn with exactly the settings of `sms-sidecar serve` (sidecar/cli.py `serve`).

    .venv/bin/python bench/floor_app.py        # listens on $HOST:$PORT (127.0.0.1:8091)
"""

from __future__ import annotations

import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def hook(request: Request) -> Response:
    await request.body()
    return JSONResponse({})


async def readyz(request: Request) -> Response:
    return JSONResponse({"status": "ready"})


app = Starlette(
    routes=[
        Route("/hooks/send-sms", hook, methods=["POST"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
)


def main() -> None:
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=os.environ.get("HOST", "127.0.0.1"),
            port=int(os.environ.get("PORT", "8091")),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
            backlog=1024,
        )
    )
    server.run()


if __name__ == "__main__":
    main()
