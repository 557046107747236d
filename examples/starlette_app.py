"""A Starlette app served by uvicorn on uringloop.

Run it with uvicorn's own command line (the loop is a `module:factory` string):

    uvicorn starlette_app:app --app-dir examples --loop uringloop:new_event_loop [--workers 2]

or with `python examples/starlette_app.py [--port 8000] [--workers N]`, which does the same
through `uvicorn.run()`. Behind gunicorn, one uringloop per worker process:

    gunicorn -c examples/gunicorn.conf.py

Routes:
  GET /              a greeting that names the loop and the worker process
  GET /stream?n=N    a StreamingResponse of N lines from an async generator
  GET /files/{name}  a FileResponse from $EXAMPLE_ROOT (default: the working directory)
  WS  /ws            a websocket that echoes every message
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

ROOT = pathlib.Path(os.environ.get("EXAMPLE_ROOT", ".")).resolve()


async def hello(request: Request) -> PlainTextResponse:
    loop = asyncio.get_running_loop()
    return PlainTextResponse(f"Hello from Starlette on {type(loop).__name__} in {os.getpid()}\n")


async def stream(request: Request) -> StreamingResponse:
    try:
        n = int(request.query_params.get("n", "10"))
    except ValueError:
        raise HTTPException(400, "n must be an integer") from None

    async def lines() -> AsyncIterator[bytes]:
        for i in range(n):
            yield f"line {i}\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(lines(), media_type="text/plain")


async def files(request: Request) -> FileResponse:
    path = (ROOT / request.path_params["name"]).resolve()
    if not path.is_relative_to(ROOT) or not path.is_file():
        raise HTTPException(404)
    return FileResponse(path)


async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        pass


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/stream", stream),
        Route("/files/{name:path}", files),
        WebSocketRoute("/ws", websocket_echo),
    ]
)


if __name__ == "__main__":
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    # uvicorn prints "Uvicorn running on http://host:port"; with workers it needs an
    # import string, which it resolves from this file's directory.
    uvicorn.run(
        "starlette_app:app",
        app_dir=os.path.dirname(os.path.abspath(__file__)),
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uringloop:new_event_loop",
    )
