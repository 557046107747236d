"""One-way bulk send over loopback TCP: throughput and the sender's CPU seconds per GiB.

usage: python -m bench.bulk --loop=asyncio|uvloop|uringloop|uringloop-copy --size=65536
                            --total=536870912 --port=PORT
Connects to a sink on 127.0.0.1:PORT, writes the same immutable bytes object of --size
bytes until --total bytes are out (following the transport's flow control), and prints one
JSON line. The sink (`python -m bench.bulk --sink`) reads and discards.

"uringloop" sends writes at or above the zero-copy threshold with SEND_ZC (forced with
zerocopy="always", since loopback would otherwise switch the socket to copying);
"uringloop-copy" uses plain sends. Over loopback the kernel copies zero-copy data at
delivery anyway, so this shows the protocol's cost, not its saving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time

from .loops import loop_factory


class Sender(asyncio.Protocol):
    def __init__(self, chunk: bytes, total: int, done: asyncio.Future) -> None:
        self.chunk, self.left, self.done = chunk, total, done
        self.paused = False

    def connection_made(self, transport):
        self.transport = transport
        self.pump()

    def pump(self):
        while self.left > 0 and not self.paused:
            self.transport.write(self.chunk)
            self.left -= len(self.chunk)
        if self.left <= 0 and not self.done.done():
            self.transport.close()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.pump()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(exc)


async def send(size: int, total: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    chunk = bytes(size)
    await loop.create_connection(lambda: Sender(chunk, total, done), "127.0.0.1", port)
    exc = await done
    if exc is not None:
        raise exc


def sink(port_file: str | None) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    print(f"READY {srv.getsockname()[1]}", flush=True)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv_into(buf):
                pass
            print("DONE", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sink", action="store_true")
    ap.add_argument("--loop", default="uringloop")
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--total", type=int, default=512 << 20)
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    if args.sink:
        sink(None)
        return
    if args.loop.startswith("uringloop"):
        import uringloop

        mode = "never" if args.loop == "uringloop-copy" else "always"
        loop = uringloop.UringEventLoop(zerocopy=mode, zc_threshold=16 * 1024)
    else:
        loop = loop_factory(args.loop)()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loop.run_until_complete(send(args.size, args.total, args.port))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    stats = loop.zerocopy_stats() if hasattr(loop, "zerocopy_stats") else {}
    loop.close()
    gib = args.total / (1 << 30)
    print(
        json.dumps(
            {
                "gbytes_per_s": args.total / wall / 1e9,
                "cpu_s_per_gib": cpu / gib,
                "zc_sends": stats.get("zc_sends", 0),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
