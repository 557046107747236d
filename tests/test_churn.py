"""Connection churn: thousands of short connections leave nothing behind (issue 16).

Both ends run on one uringloop loop: a Protocol server that echoes, or aborts on "!",
and an asyncio streams client: echoes of 4 KiB and 256 KiB closed by the client or
half-closed; resets by the client, aborts by the server, abort() by the client. After
a warm-up (the buffer ring's pages, allocator arenas and caches fill up) the process's
counters are the baseline; after the churn, once every connection has ended on both
sides, each must be back: open fds exactly, requests in the kernel and operation
records, provided buffers out of the buffer rings, tasks and transports; nothing lent
to the kernel for SEND_ZC; RSS within a few MiB of allocator noise.
`python -m bench --only=churn` is the long version (100,000 cycles of each kind, with a
C client too, and a plot of every counter).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

CYCLES = 10_000
# (the 512 buffers of the stream buffer ring are first written, and their first pages
# counted in RSS, after 512 receives: 1,536 abort cycles)
WARMUP = 2_000
CONCURRENT = 4
DATAGRAM_CYCLES = 3_000
PAYLOAD = b"x" * 4096
# every eighth echo is large: the stream switches to single-shot receives into bytes
# objects (a cancel of the multishot one), and the client's StreamReader pauses reading
LARGE = bytes(range(256)) * 1024
RSS_SLACK_KIB = 4096
PAGE = os.sysconf("SC_PAGESIZE")


def counters(loop: asyncio.AbstractEventLoop) -> dict[str, int]:
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    stats, zc = loop._ring.stats(), loop._ring.zerocopy_stats()
    return {
        "fds": len(os.listdir("/proc/self/fd")) - 1,  # (less the listing's own)
        "rss_kib": rss_pages * PAGE // 1024,
        "recv_buffers_out": stats["recv_buffers_out"],
        "datagram_buffers_out": loop._ring.datagram_stats()["buffers_out"],
        "inflight": stats["inflight"],
        "records": stats["records"],
        "pinned_buffers": zc["pinned_buffers"],
        "pinned_bytes": zc["pinned_bytes"],
        "zerocopy_buffer_bytes": zc["zerocopy_buffer_bytes"],
        "tasks": len(asyncio.all_tasks(loop)),
        "transports": len(loop._transports) + len(loop._lingering),
    }


class ChurnServer(asyncio.Protocol):
    """Echoes; aborts on "!". Counts how its connections ended."""

    live = 0
    ends: dict[str, int]

    def connection_made(self, transport):
        self.transport = transport
        self.first = True
        type(self).live += 1

    def data_received(self, data):
        if self.first and data[:1] == b"!":
            self.ends["server_abort"] += 1
            self.transport.abort()
            return
        self.first = False
        self.transport.write(data)

    def eof_received(self):
        self.ends["eof_before_data" if self.first else "eof_after_echo"] += 1
        # (returns None: the transport closes, after the echo has gone out)

    def connection_lost(self, exc):
        type(self).live -= 1
        if exc is not None:
            self.ends[type(exc).__name__] = self.ends.get(type(exc).__name__, 0) + 1


async def cycle(port: int, kind: str, n: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == "echo":
            payload = LARGE if n % 8 == 7 else PAYLOAD
            writer.write(payload)
            if n % 2:  # the client closes first
                assert await reader.readexactly(len(payload)) == payload
            else:  # a half-close: the server closes once it has echoed everything
                writer.write_eof()
                assert await reader.read() == payload
        elif n % 3 == 0:  # a reset from this side
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif n % 3 == 1:  # the server aborts; read until the end it makes
            writer.write(b"!")
            while await reader.read(65536):
                pass
        else:  # abort() with nothing sent or unread: a FIN, as on asyncio's loop
            writer.transport.abort()
        writer.close()
        await writer.wait_closed()
    except ConnectionResetError:
        writer.close()  # (the server's end came as a reset: already closed)


async def churn(kind: str, cycles: int) -> tuple[dict, dict, dict, dict]:
    """(baseline, final, ends, ring stats): counters after WARMUP cycles and at the end."""
    loop = asyncio.get_running_loop()
    ChurnServer.live = 0
    ChurnServer.ends = {"server_abort": 0, "eof_before_data": 0, "eof_after_echo": 0}
    server = await loop.create_server(ChurnServer, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]

    async def run(first: int, end: int) -> None:
        async def worker(numbers: range) -> None:
            for n in numbers:
                await cycle(port, kind, n)

        await asyncio.gather(
            *(worker(range(first + i, end, CONCURRENT)) for i in range(CONCURRENT))
        )
        deadline = loop.time() + 10
        # every server-side connection_lost() has run, no socket waits for its receive
        while ChurnServer.live or loop._lingering:
            assert loop.time() < deadline, (ChurnServer.live, loop._lingering)
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)  # (the handles connection_lost() scheduled have run)

    async with server:
        await run(0, WARMUP)
        baseline = counters(loop)
        await run(WARMUP, cycles)
        final = counters(loop)
    return baseline, final, dict(ChurnServer.ends), loop._ring.stats()


def assert_back_to_baseline(baseline: dict, final: dict) -> None:
    exact = {k: v for k, v in final.items() if k != "rss_kib"}
    assert exact == {k: v for k, v in baseline.items() if k != "rss_kib"}, (baseline, final)
    assert final["pinned_bytes"] == 0 and final["pinned_buffers"] == 0, final
    assert final["recv_buffers_out"] == 0 and final["datagram_buffers_out"] == 0, final
    grown = final["rss_kib"] - baseline["rss_kib"]
    assert grown <= RSS_SLACK_KIB, f"RSS grew by {grown} KiB over {CYCLES - WARMUP:,} cycles"


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_connect_echo_close_churn_leaves_nothing_behind():
    baseline, final, ends, stats = await churn("echo", CYCLES)
    assert_back_to_baseline(baseline, final)
    # every connection was echoed and ended by the client's close: nothing else
    assert ends == {
        "server_abort": 0,
        "eof_before_data": 0,
        "eof_after_echo": CYCLES,
    }, ends
    assert stats["recv_buffer_ring"] and stats["recv_multishot_cqes"] >= CYCLES, stats


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_connect_abort_churn_leaves_nothing_behind():
    baseline, final, ends, stats = await churn("abort", CYCLES)
    assert_back_to_baseline(baseline, final)
    # a third each: reset by the client, aborted by the server, abort()ed by the client
    third = CYCLES // 3
    assert ends["server_abort"] in (third, third + 1), ends
    assert ends["ConnectionResetError"] in (third, third + 1), ends
    assert ends["eof_before_data"] in (third, third + 1), ends
    assert sum(ends.values()) == CYCLES, ends


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class DatagramClient(asyncio.DatagramProtocol):
    def __init__(self, want: int) -> None:
        self.got: list[bytes] = []
        self.want = want
        self.done = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        self.got.append(data)
        if len(self.got) == self.want:
            self.done.set_result(None)

    def connection_lost(self, exc):
        self.lost.set_result(exc)


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_datagram_endpoint_churn_leaves_nothing_behind():
    """Endpoints made, used (through the datagram buffer ring) and closed or aborted."""
    loop = asyncio.get_running_loop()
    server, _ = await loop.create_datagram_endpoint(DatagramEcho, local_addr=("127.0.0.1", 0))
    addr = server.get_extra_info("sockname")
    datagrams = [bytes([i]) * 1024 for i in range(3)]

    async def run(first: int, end: int) -> None:
        for n in range(first, end):
            transport, proto = await loop.create_datagram_endpoint(
                lambda: DatagramClient(len(datagrams)), remote_addr=addr
            )
            for d in datagrams:
                transport.sendto(d)
            await asyncio.wait_for(proto.done, 10)
            assert sorted(proto.got) == datagrams
            if n % 2:
                transport.abort()
            else:
                transport.close()
            assert await proto.lost is None

    try:
        await run(0, 500)
        baseline = counters(loop)
        await run(500, DATAGRAM_CYCLES)
        final = counters(loop)
    finally:
        server.close()
    assert_back_to_baseline(baseline, final)
    stats = loop._ring.datagram_stats()
    assert stats["buffer_ring"] and stats["recv_multishot_cqes"] >= 2 * 3 * DATAGRAM_CYCLES, stats
