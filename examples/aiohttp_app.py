"""An aiohttp app on uringloop: `python examples/aiohttp_app.py [--port 8080] [--root DIR]`.

Routes:
  GET /              a greeting that names the loop
  GET /stream?n=N    a chunked response of N lines, written as they are produced
  GET /files/{name}  a file from --root, sent with loop.sendfile() (spliced in the kernel)
  GET /ws            a websocket that echoes every message
  GET /stats         the loop's write-path counters (zero-copy sends, spliced bytes)

Try it: `curl localhost:8080/`, `curl localhost:8080/files/README.md`,
`python -m aiohttp.web`-style clients, or any websocket client on ws://localhost:8080/ws.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib

from aiohttp import WSMsgType, web

import uringloop

ROOT = web.AppKey("root", pathlib.Path)


async def hello(request: web.Request) -> web.Response:
    loop = asyncio.get_running_loop()
    return web.Response(text=f"Hello from aiohttp on {type(loop).__name__}\n")


async def stream(request: web.Request) -> web.StreamResponse:
    try:
        n = int(request.query.get("n", "10"))
    except ValueError:
        raise web.HTTPBadRequest(text="n must be an integer\n") from None
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    for i in range(n):
        await response.write(f"line {i}\n".encode())
        await asyncio.sleep(0)  # a producer that yields between chunks
    await response.write_eof()
    return response


async def files(request: web.Request) -> web.FileResponse:
    root = request.app[ROOT]
    path = (root / request.match_info["name"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path)


async def websocket_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def stats(request: web.Request) -> web.Response:
    loop = asyncio.get_running_loop()
    counters = loop.zerocopy_stats() if isinstance(loop, uringloop.UringEventLoop) else {}
    return web.json_response({"loop": type(loop).__name__, **counters})


def make_app(root: pathlib.Path) -> web.Application:
    app = web.Application()
    app[ROOT] = root.resolve()
    app.add_routes(
        [
            web.get("/", hello),
            web.get("/stream", stream),
            web.get("/files/{name:.+}", files),
            web.get("/ws", websocket_echo),
            web.get("/stats", stats),
        ]
    )
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--root", type=pathlib.Path, default=pathlib.Path.cwd(), help="files to serve")
    args = ap.parse_args()
    loop = uringloop.new_event_loop()

    def announce(message: str) -> None:
        # aiohttp says "======== Running on http://host:port ========\n(Press CTRL+C to quit)"
        where = message.splitlines()[0].strip("= ").removeprefix("Running on ")
        print(f"aiohttp on {type(loop).__name__} listening on {where}", flush=True)

    # run_app runs the app on the loop it is given, and closes it at the end
    web.run_app(make_app(args.root), host=args.host, port=args.port, loop=loop, print=announce)


if __name__ == "__main__":
    main()
