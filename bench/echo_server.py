"""Echo server for the benchmarks, on a chosen loop and API style.

usage: python -m bench.echo_server --loop=uringloop --mode=sock|streams|protocol [--port 0]
Prints "READY <port>" once listening; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

from .loops import LOOPS, VARIANTS, loop_factory


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.transport.write(data)


# The load generator ends its connections with a reset when it exits; that is not an error.


async def sock_echo(loop, conn):
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := await loop.sock_recv(conn, 262144):
                await loop.sock_sendall(conn, data)
        except ConnectionError:
            pass


async def streams_echo(reader, writer):
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def serve(mode: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if mode == "protocol":
        server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=1024)
        port = server.sockets[0].getsockname()[1]
    elif mode == "streams":
        server = await asyncio.start_server(streams_echo, "127.0.0.1", port, backlog=1024)
        port = server.sockets[0].getsockname()[1]
    else:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(1024)
        srv.setblocking(False)
        port = srv.getsockname()[1]
    print(f"READY {port}", flush=True)
    if mode == "sock":
        tasks = set()
        while True:
            conn, _ = await loop.sock_accept(srv)
            task = loop.create_task(sock_echo(loop, conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    else:
        # Serving started with create_server: wait for ever (rloop 0.5 stops listening
        # when serve_forever() is called on a server that is already serving).
        async with server:
            await loop.create_future()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop", choices=LOOPS + VARIANTS, required=True)
    ap.add_argument("--mode", choices=("sock", "streams", "protocol"), default="sock")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    loop = loop_factory(args.loop)()
    try:
        loop.run_until_complete(serve(args.mode, args.port))
    except KeyboardInterrupt:
        pass
    finally:
        if os.environ.get("BENCH_STATS") and hasattr(loop, "ring_info"):
            print(loop.ring_info(), loop.zerocopy_stats(), file=sys.stderr, flush=True)
        loop.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
