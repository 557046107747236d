"""One-way bulk send: throughput and the sender's CPU seconds per GiB.

usage: python -m bench.bulk --proto=tcp --loop=VARIANT --size=65536 --total=536870912 --port=PORT
       python -m bench.bulk --proto=file --loop=VARIANT --size=FILE_BYTES --total=... --port=PORT
       python -m bench.bulk --proto=udp --loop=VARIANT --size=65000 --total=... --addr=10.77.0.2
       python -m bench.bulk --sink          (TCP only: reads and discards, prints READY <port>)

Writes the same payload of --size bytes until --total bytes are out and prints one JSON
line. Variants (--loop):

  asyncio, uvloop        the loop's own transport (TCP: transport.write with flow control;
                         UDP: a connected datagram endpoint's sendto)
  uringloop-copy         uringloop with zerocopy="never": every write copied by the kernel
  uringloop              immutable bytes sent with SEND_ZC from the object's own memory
  uringloop-fixed        a ZeroCopyBuffer from the registered pool: fixed-buffer SEND_ZC,
                         no copy and no per-send page pinning
  uringloop-fixed-copy   a mutable bytearray copied into a ZeroCopyBuffer, then sent as
                         above: the price of zero-copy for data asyncio must copy anyway

--proto=file sends a file of --size bytes (page cache warm) over one TCP connection until
--total bytes are out, with loop.sendfile(): os.sendfile on asyncio, SPLICE requests on
uringloop; uvloop has no sendfile, so it gets what aiohttp does then: read 256 KiB chunks
and write them.

TCP goes over loopback, where the kernel copies zero-copy data at delivery anyway (it
shows the protocol's cost, not its saving). UDP goes to an address routed to a veth whose
peer is down, inside a network namespace the caller made (`bench.netns`): packets are
dropped in the device, so the sender does the real zero-copy work. uringloop's UDP
variants use sock_sendall/sock_sendzc with several sends in flight.
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

VARIANTS = (
    "asyncio",
    "uvloop",
    "uringloop-copy",
    "uringloop",
    "uringloop-fixed",
    "uringloop-fixed-copy",
)
UDP_IN_FLIGHT = 8


def make_loop(variant: str) -> asyncio.AbstractEventLoop:
    if not variant.startswith("uringloop"):
        return loop_factory(variant)()
    import uringloop

    # "always": loopback would otherwise switch a socket to copying after a few sends
    mode = "never" if variant == "uringloop-copy" else "always"
    return uringloop.UringEventLoop(zerocopy=mode, zc_threshold=16 * 1024)


class FlowControl(asyncio.Protocol):
    """A protocol whose drain() waits while the transport asked to pause."""

    def __init__(self) -> None:
        self.resumed: asyncio.Future | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)
        self.resumed = None

    async def drain(self) -> None:
        if self.resumed is not None:
            await self.resumed

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def error_received(self, exc) -> None:  # datagram endpoints
        raise exc


def payloads(loop, variant: str, size: int):
    """What each write sends: the same object each time, or a refilled pool buffer."""
    if variant == "uringloop-fixed":
        buf = loop.alloc_zerocopy_buffer(size)
        memoryview(buf)[:] = b"z" * size
        while True:
            yield buf  # lent several times over: the kernel only reads it
    elif variant == "uringloop-fixed-copy":
        source = bytearray(b"m" * size)
        while True:
            buf = loop.alloc_zerocopy_buffer(size)  # back to the pool once released
            memoryview(buf)[:] = source
            yield buf
    else:
        chunk = bytes(size)
        while True:
            yield chunk


async def send_tcp(variant: str, size: int, total: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(FlowControl, "127.0.0.1", port)
    left = total
    for chunk in payloads(loop, variant, size):
        if left <= 0:
            break
        transport.write(chunk)
        left -= size
        await proto.drain()
    transport.close()
    exc = await proto.lost
    if exc is not None:
        raise exc


FILE_CHUNK = 256 * 1024


async def send_file(variant: str, size: int, total: int, port: int) -> None:
    import tempfile

    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(FlowControl, "127.0.0.1", port)
    with tempfile.TemporaryFile() as f:
        f.write(bytes(size))
        f.flush()
        left = total
        while left > 0:
            f.seek(0)
            if variant == "uvloop":
                while chunk := f.read(FILE_CHUNK):
                    transport.write(chunk)
                    await proto.drain()
            else:
                await loop.sendfile(transport, f)
            left -= size
    transport.close()
    exc = await proto.lost
    if exc is not None:
        raise exc


def udp_count(size: int, total: int) -> int:
    """Datagrams to send: a multiple of UDP_IN_FLIGHT, the same for every variant."""
    return max(total // size // UDP_IN_FLIGHT, 1) * UDP_IN_FLIGHT


async def send_udp(variant: str, size: int, total: int, addr: str) -> None:
    """Datagrams through create_datagram_endpoint's transport on every loop: sendto()
    with the variant's payload (bytes; a ZeroCopyBuffer for the -fixed variants), the
    protocol's flow control letting UDP_IN_FLIGHT datagrams be queued at once."""
    loop = asyncio.get_running_loop()
    count = udp_count(size, total)
    transport, proto = await loop.create_datagram_endpoint(FlowControl, remote_addr=(addr, 9))
    transport.set_write_buffer_limits(high=UDP_IN_FLIGHT * size)
    source = payloads(loop, variant, size)
    for i in range(count):
        transport.sendto(next(source))
        if i % 64 == 63:
            await asyncio.sleep(0)
        await proto.drain()
    while transport.get_write_buffer_size():
        await asyncio.sleep(0.001)  # (zero-copy: the last notifications)
    transport.close()


def sink() -> None:
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
    ap.add_argument("--proto", choices=("tcp", "udp", "file"), default="tcp")
    ap.add_argument("--loop", choices=VARIANTS, default="uringloop")
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--total", type=int, default=512 << 20)
    ap.add_argument("--port", type=int)
    ap.add_argument("--addr", default="10.77.0.2")
    args = ap.parse_args()
    if args.sink:
        sink()
        return
    loop = make_loop(args.loop)
    if args.proto == "tcp":
        coro = send_tcp(args.loop, args.size, args.total, args.port)
    elif args.proto == "file":
        coro = send_file(args.loop, args.size, args.total, args.port)
    else:
        coro = send_udp(args.loop, args.size, args.total, args.addr)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loop.run_until_complete(coro)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    kernel = r1.ru_stime - r0.ru_stime
    cpu = (r1.ru_utime - r0.ru_utime) + kernel
    stats = loop.zerocopy_stats() if hasattr(loop, "zerocopy_stats") else {}
    if args.proto == "udp" and hasattr(loop, "_ring"):
        dg = loop._ring.datagram_stats()
        stats = {**stats, "zc_sends": dg["zc_sends"], "datagram_sends": dg["sends"]}
    loop.close()
    if args.proto == "udp":
        sent = udp_count(args.size, args.total) * args.size
    else:
        sent = -(-args.total // args.size) * args.size if args.proto == "file" else args.total
    print(
        json.dumps(
            {
                "gbytes_per_s": sent / wall / 1e9,
                "cpu_s_per_gib": cpu / (sent / (1 << 30)),
                # the kernel's share: where a copy is saved or paid
                "kernel_cpu_s_per_gib": kernel / (sent / (1 << 30)),
                "zc_sends": stats.get("zc_sends", 0),
                "zc_copied_notifications": stats.get("zc_copied_notifications", 0),
                "fixed_buffer_sends": stats.get("fixed_buffer_sends", 0),
                "sendfile_spliced_bytes": stats.get("sendfile_spliced_bytes", 0),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
