"""HTTP servers for the benchmarks: aiohttp, and Starlette under uvicorn or hypercorn.

usage: python -m bench.http_server --loop=asyncio|uvloop|uringloop
                                  --server=aiohttp|uvicorn|hypercorn
Serves GET / ("Hello, World!") and GET /1m (1 MiB of bytes: large enough for SEND_ZC) on
127.0.0.1, prints "READY <port>" once listening, and runs until killed. Each server runs
inside a loop made by the benchmark's loop factory, the way an application would run it
under `asyncio.Runner(loop_factory=...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from .loops import LOOPS, loop_factory

HELLO = b"Hello, World!"
ONE_MIB = bytes(range(256)) * 4096
SERVERS = ("aiohttp", "uvicorn", "hypercorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse("Hello, World!")

    async def big(request):
        return Response(ONE_MIB, media_type="application/octet-stream")

    return Starlette(routes=[Route("/", hello), Route("/1m", big)])


async def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def hello(request):
        return web.Response(body=HELLO, content_type="text/plain")

    async def big(request):
        return web.Response(body=ONE_MIB, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/1m", big)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"READY {port}", flush=True)
    await asyncio.Event().wait()


async def serve_uvicorn(port: int) -> None:
    import uvicorn

    try:
        import httptools  # noqa: F401  (uvicorn's fast parser, as in `uvicorn[standard]`)

        http = "httptools"
    except ImportError:
        http = "h11"
    config = uvicorn.Config(
        starlette_app(),
        host="127.0.0.1",
        port=port,
        loop="none",
        http=http,
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=1024,
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    print(f"READY {port}", flush=True)
    await task


async def serve_hypercorn(port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.backlog = 1024
    task = asyncio.ensure_future(serve(starlette_app(), config))
    # hypercorn has no "started" flag: wait until the port answers
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        if task.done():
            task.result()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            break
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)
    print(f"READY {port}", flush=True)
    await task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop", choices=LOOPS, required=True)
    ap.add_argument("--server", choices=SERVERS, required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    port = args.port or free_port()
    serve = {"aiohttp": serve_aiohttp, "uvicorn": serve_uvicorn, "hypercorn": serve_hypercorn}
    loop = loop_factory(args.loop)()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve[args.server](port))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
