"""UDP echo server for the benchmarks, on a chosen loop.

usage: python -m bench.udp_echo_server --loop=uringloop [--port 0] [--rcvbuf BYTES]
Prints "READY <port>" once bound to 127.0.0.1 and runs until killed; prints
"UNSUPPORTED <why>" and exits 3 when the loop cannot make a datagram endpoint.

The socket is made here (with the receive buffer the C reference server gets too) and
handed to loop.create_datagram_endpoint(sock=...); the protocol echoes each datagram
with transport.sendto(data, addr).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

from .loops import LOOPS, VARIANTS, loop_factory

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not in the socket module


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)

    def error_received(self, exc):
        # e.g. a late echo to a load generator that has exited: not the server's problem
        pass


def bound_socket(port: int, rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:  # not root: capped at net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def serve(port: int, rcvbuf: int) -> None:
    loop = asyncio.get_running_loop()
    sock = bound_socket(port, rcvbuf)
    port = sock.getsockname()[1]
    try:
        transport, _ = await loop.create_datagram_endpoint(UdpEcho, sock=sock)
    except Exception as exc:  # a loop without (working) datagram endpoints
        print(f"UNSUPPORTED create_datagram_endpoint: {exc!r}", flush=True)
        sys.exit(3)
    print(f"READY {port}", flush=True)
    try:
        await loop.create_future()
    finally:
        transport.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop", choices=LOOPS + VARIANTS, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF bytes (0: the default)")
    args = ap.parse_args()
    loop = loop_factory(args.loop)()
    try:
        loop.run_until_complete(serve(args.port, args.rcvbuf))
    except KeyboardInterrupt:
        pass
    finally:
        if os.environ.get("BENCH_STATS") and hasattr(loop, "ring_info"):
            print(loop.ring_info(), file=sys.stderr, flush=True)
        loop.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
