"""Connection churn soak: many short connections, and what each leaves behind (issue 16).

usage: python -m bench.churn serve [--loop=uringloop] [--port 0]
       python -m bench.churn inproc --kind=echo|abort --cycles N --every K
                                    [--size 4096] [--conc 4] [--loop=uringloop]

A cycle is one connection: `echo` connects, sends `size` bytes, reads the echo back and
closes; `abort` connects and then, by cycle number n: n % 3 == 0, the client resets it
(SO_LINGER 0, then transport.abort() or close()); 1, the server aborts it (the client
sends "!", the server calls transport.abort()); 2, the client calls transport.abort()
(or the C client close()) with nothing sent, which ends it with a FIN.

`serve` is the server alone, for the C client (bench/churn_client.c): a streams server
(asyncio.start_server, one handler task per connection) that echoes, aborts on "!", and
answers "?N\\n" with one JSON line of counters, once it has seen N connections and each
of them has ended. `inproc` runs the same server and an asyncio streams client on one
loop in this process and prints one JSON line of counters every K cycles.

The counters, all of this process: open file descriptors, RSS, provided buffers taken
out of the stream and datagram buffer rings and not given back, bytes of the registered
pool handed out, bytes lent to the kernel for SEND_ZC, requests in the kernel and
operation records in the ring's table, tasks, and live transports. A sample is taken
only once every connection so far has ended on both sides, so a churn that leaks
nothing keeps every counter at the value it had after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys
import time

from .loops import LOOPS, VARIANTS, loop_factory

PAGE = os.sysconf("SC_PAGESIZE")
SETTLE_SECONDS = 10.0

# (counter, unit, allowed growth from the baseline to the end)
COUNTERS = (
    ("fds", "", 0),
    ("rss_kib", "KiB", 4096),
    ("recv_buffers_out", "", 0),
    ("datagram_buffers_out", "", 0),
    ("zerocopy_buffer_bytes", "B", 0),
    ("pinned_bytes", "B", 0),
    ("inflight", "", 0),
    ("records", "", 0),
    ("tasks", "", 0),
    ("transports", "", 0),
)


def sample(loop: asyncio.AbstractEventLoop) -> dict[str, int]:
    """This process's counters now (the ring's only on uringloop)."""
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    out = {
        "fds": len(os.listdir("/proc/self/fd")) - 1,  # (less the listing's own)
        "rss_kib": rss_pages * PAGE // 1024,
        "tasks": len(asyncio.all_tasks(loop)),
    }
    transports = getattr(loop, "_transports", None)
    if transports is not None:
        out["transports"] = len(transports) + len(getattr(loop, "_lingering", ()))
    ring = getattr(loop, "_ring", None)
    if ring is not None:
        stats, zc = ring.stats(), ring.zerocopy_stats()
        out.update(
            recv_buffers_out=stats["recv_buffers_out"],
            datagram_buffers_out=ring.datagram_stats()["buffers_out"],
            zerocopy_buffer_bytes=zc["zerocopy_buffer_bytes"],
            pinned_bytes=zc["pinned_bytes"],
            inflight=stats["inflight"],
            records=stats["records"],
        )
    return out


def warmup_cycles(cycles: int) -> int:
    """Cycles before the baseline: buffer-ring pages, allocator arenas, caches fill up.

    The stream buffer ring (512 buffers) hands its buffers out in turn, so each is first
    written, and its first page counted in RSS, only after 512 receives: a third of
    the abort cycles receive anything, so they take about 1,500 cycles to get there.
    """
    return min(max(2000, cycles // 20), cycles // 2)


def sample_every(cycles: int) -> int:
    return max(100, cycles // 50)


def flatness(samples: list[dict], cycles: int) -> tuple[int, list[dict]]:
    """(baseline cycle, one row per counter): baseline, final and max value, and whether
    the final value is within the counter's slack of the baseline."""
    warm = warmup_cycles(cycles)
    base = next(s for s in samples if s["cycle"] >= warm)
    final = samples[-1]
    rows = []
    for name, unit, slack in COUNTERS:
        if name in final:
            rows.append(
                {
                    "counter": name,
                    "unit": unit,
                    "baseline": base[name],
                    "final": final[name],
                    "max": max(s[name] for s in samples),
                    "slack": slack,
                    "ok": final[name] - base[name] <= slack,
                }
            )
    unsettled = [s["cycle"] for s in samples if not s["settled"]]
    rows.append(
        {
            "counter": f"samples where a connection had not ended after {SETTLE_SECONDS:.0f} s",
            "unit": "",
            "baseline": 0,
            "final": len(unsettled),
            "max": len(unsettled),
            "slack": 0,
            "ok": not unsettled,
        }
    )
    return base["cycle"], rows


class ChurnServer:
    """Echo, abort on "!", counters on "?N": one handler task per connection."""

    def __init__(self) -> None:
        self.started = 0  # connections accepted (the control ones not counted)
        self.live = 0  # of those, handlers not finished (their transport not lost yet)
        # how connections ended here: echoed, aborted by the server, reset by the
        # client, or an end of file before any byte
        self.ends = {"echo": 0, "server_abort": 0, "client_reset": 0, "eof": 0}
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", port, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    async def settle(self, expected: int) -> bool:
        """Wait until `expected` connections came and went; False after SETTLE_SECONDS."""
        deadline = time.monotonic() + SETTLE_SECONDS
        # (uringloop: a closed socket may wait an iteration for its receive's end)
        lingering = getattr(asyncio.get_running_loop(), "_lingering", ())
        while self.started < expected or self.live or lingering:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.001)
        return True

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.started += 1
        self.live += 1
        counted = True
        try:
            data = await reader.read(65536)
            if data[:1] == b"?":  # control: not a cycle
                self.started -= 1
                self.live -= 1
                counted = False
                line = data
                while not line.endswith(b"\n"):
                    more = await reader.read(64)
                    if not more:
                        writer.close()
                        return
                    line += more
                settled = await self.settle(int(line[1:]))
                for _ in range(3):  # (the accept task of this connection ends)
                    await asyncio.sleep(0)
                loop = asyncio.get_running_loop()
                reply = {"settled": settled, "ends": self.ends, **sample(loop)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            elif data[:1] == b"!":
                writer.transport.abort()
                self.ends["server_abort"] += 1
            else:
                self.ends["echo" if data else "eof"] += 1
                while data:
                    writer.write(data)
                    await writer.drain()
                    data = await reader.read(65536)
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            # (the client's reset: the transport is already closed)
            self.ends["client_reset"] += 1
            writer.close()
        finally:
            if counted:
                self.live -= 1


async def client_cycle(port: int, kind: str, n: int, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == "echo":
            writer.write(payload)
            if await reader.readexactly(len(payload)) != payload:
                raise RuntimeError("the echo differs from what was sent")
        elif n % 3 == 0:  # a reset from this side
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
        elif n % 3 == 2:  # abort() alone: a FIN, as on asyncio's loop (nothing is unread)
            writer.transport.abort()
        else:  # abort from the server's side: read until the end it makes
            writer.write(b"!")
            try:
                while await reader.read(65536):
                    pass
            except ConnectionError:
                pass
        writer.close()
        await writer.wait_closed()
    except ConnectionError:
        writer.close()  # (the reset of an abort: already closed)


async def inproc(kind: str, cycles: int, every: int, size: int, conc: int) -> None:
    loop = asyncio.get_running_loop()
    server = ChurnServer()
    port = await server.start()
    payload = b"x" * size
    done = 0

    def emit(settled: bool) -> None:
        line = {"cycle": done, "settled": settled, "ends": server.ends, **sample(loop)}
        print(json.dumps(line), flush=True)

    async def worker(cycle_numbers: range) -> None:
        for n in cycle_numbers:
            await client_cycle(port, kind, n, payload)

    emit(True)
    while done < cycles:
        end = min(done + every, cycles)
        await asyncio.gather(*(worker(range(done + i, end, conc)) for i in range(conc)))
        done = end
        emit(await server.settle(done))
    server.server.close()
    await server.server.wait_closed()


async def serve(port: int) -> None:
    server = ChurnServer()
    port = await server.start(port)
    print(f"READY {port}", flush=True)
    async with server.server:
        await asyncio.get_running_loop().create_future()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.churn")
    ap.add_argument("what", choices=("serve", "inproc"))
    ap.add_argument("--loop", choices=LOOPS + VARIANTS, default="uringloop")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--kind", choices=("echo", "abort"), default="echo")
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--conc", type=int, default=4)
    args = ap.parse_args()
    loop = loop_factory(args.loop)()
    try:
        if args.what == "serve":
            loop.run_until_complete(serve(args.port))
        else:
            loop.run_until_complete(
                inproc(args.kind, args.cycles, args.every, args.size, args.conc)
            )
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
