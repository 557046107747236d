"""loop.alloc_zerocopy_buffer(), the memory bounds of zero-copy sends, and memlock refusal.

These are uringloop's own features (asyncio and uvloop have no equivalent), so the tests
run on uringloop only, over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

import uringloop

HERE = os.path.dirname(os.path.abspath(__file__))
needs_zc = pytest.mark.skipif(
    not uringloop.probe().send_zc_report_usage, reason="this kernel has no SEND_ZC usage reports"
)


def run(coro, **options):
    loop = uringloop.new_event_loop(**options)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data.extend(data)


class Writer(asyncio.Protocol):
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def pause_writing(self):
        self.paused += 1

    def resume_writing(self):
        self.resumed += 1

    def connection_lost(self, exc):
        self.lost.set_result(exc)


async def tcp_pair():
    loop = asyncio.get_running_loop()
    sinks: list[Sink] = []

    def factory():
        sinks.append(Sink())
        return sinks[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    transport, writer = await loop.create_connection(Writer, *server.sockets[0].getsockname())
    while not sinks or sinks[0].transport is None:
        await asyncio.sleep(0.001)
    return server, sinks[0], writer


async def until(predicate, what: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def teardown(server, sink, writer) -> None:
    writer.transport.close()
    await asyncio.wait_for(writer.lost, 10)
    sink.transport.close()
    server.close()
    await server.wait_closed()


def test_alloc_zerocopy_buffer_rejects_bad_sizes_like_bytearray():
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError):
            loop.alloc_zerocopy_buffer(0)
        with pytest.raises(ValueError):
            loop.alloc_zerocopy_buffer(-4096)
        with pytest.raises(TypeError):
            loop.alloc_zerocopy_buffer("4096")
        with pytest.raises(TypeError):
            loop.alloc_zerocopy_buffer(4096.0)
        return loop

    loop = run(main())
    with pytest.raises(RuntimeError):
        loop.alloc_zerocopy_buffer(4096)


@needs_zc
def test_buffer_is_sent_from_the_registered_pool_and_released_at_its_notification():
    async def main():
        loop = asyncio.get_running_loop()
        server, sink, writer = await tcp_pair()
        buf = loop.alloc_zerocopy_buffer(1 << 20)
        assert len(buf) == 1 << 20 and buf.registered and not buf.lent
        assert buf.released.done()  # nothing lent yet
        view = memoryview(buf)
        view[:] = os.urandom(len(buf))
        expected = hashlib.sha256(view).digest()
        del view
        before = loop.zerocopy_stats()
        writer.transport.write(buf)
        assert buf.lent
        with pytest.raises(TypeError):  # views taken while lent are read-only
            memoryview(buf)[0] = 0
        released = buf.released
        await asyncio.wait_for(released, 10)
        after = loop.zerocopy_stats()
        # released only once the kernel's notification for it came in
        assert after["zc_notifications"] - before["zc_notifications"] >= 1
        assert after["fixed_buffer_sends"] - before["fixed_buffer_sends"] >= 1
        assert not buf.lent
        size = len(buf)
        await until(lambda: len(sink.data) >= size, "the data")
        assert hashlib.sha256(sink.data).digest() == expected
        # the same buffer again, refilled, to the same transport
        memoryview(buf)[:] = b"\x07" * len(buf)
        writer.transport.write(buf)
        await buf.released
        await until(lambda: len(sink.data) >= 2 * size, "the second send")
        assert sink.data[size:] == b"\x07" * size
        await teardown(server, sink, writer)
        del buf, released
        gc.collect()
        assert loop.zerocopy_stats()["zerocopy_buffer_bytes"] == 0  # back in the pool
        return loop.zerocopy_stats()

    stats = run(main(), zerocopy="always")
    assert stats["pinned_bytes"] == 0 and stats["pinned_buffers"] == 0
    assert stats["zc_notifications"] == stats["zc_sends"]


@needs_zc
def test_many_buffers_interleaved_with_copied_writes_arrive_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        server, sink, writer = await tcp_pair()
        expected = hashlib.sha256()
        total = 0
        buffers = []
        for i in range(64):
            size = [100, 4096, 70_000, 1 << 20][i % 4]
            buf = loop.alloc_zerocopy_buffer(size)
            memoryview(buf)[:] = bytes([i]) * size
            writer.transport.write(buf)
            small = b"<%d>" % i
            writer.transport.write(bytearray(small))
            expected.update(bytes([i]) * size + small)
            total += size + len(small)
            buffers.append(buf)
            if i % 7 == 0:
                await asyncio.sleep(0)
        await until(lambda: len(sink.data) >= total, "all data")
        assert hashlib.sha256(sink.data).digest() == expected.digest()
        await asyncio.wait_for(asyncio.gather(*(b.released for b in buffers)), 10)
        await teardown(server, sink, writer)
        return loop.zerocopy_stats(), sum(b.registered for b in buffers)

    stats, registered = run(main(), zerocopy="always")
    assert registered >= 60  # all but what did not fit the 16 MiB pool
    assert stats["fixed_buffer_sends"] >= registered
    assert stats["zc_notifications"] == stats["zc_sends"]


def test_buffer_over_a_unix_socket_goes_plainly_and_is_released(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "zc.sock")
        sinks = []

        def factory():
            sinks.append(Sink())
            return sinks[-1]

        server = await loop.create_unix_server(factory, path)
        transport, writer = await loop.create_unix_connection(Writer, path)
        buf = loop.alloc_zerocopy_buffer(300_000)
        memoryview(buf)[:] = b"u" * len(buf)
        transport.write(buf)
        await asyncio.wait_for(buf.released, 10)
        await until(lambda: sinks and len(sinks[0].data) >= len(buf), "the data")
        assert sinks[0].data == b"u" * len(buf)
        transport.close()
        await writer.lost
        server.close()
        await server.wait_closed()
        return loop.zerocopy_stats()

    stats = run(main(), zerocopy="always")
    assert stats["zc_sends"] == 0 and stats["pinned_bytes"] == 0


@pytest.mark.parametrize(
    "options",
    [{"zerocopy": "never"}, {"zc_pool_size": 0}],
    ids=["zerocopy-never", "no-registered-pool"],
)
def test_buffers_work_without_zero_copy_or_registration(options):
    async def main():
        loop = asyncio.get_running_loop()
        server, sink, writer = await tcp_pair()
        buf = loop.alloc_zerocopy_buffer(500_000)
        assert not buf.registered or "zerocopy" in options
        memoryview(buf)[:] = b"n" * len(buf)
        writer.transport.write(buf)
        await asyncio.wait_for(buf.released, 10)
        await until(lambda: len(sink.data) >= 500_000, "the data")
        assert sink.data == b"n" * 500_000
        await teardown(server, sink, writer)
        return loop.zerocopy_stats()

    stats = run(main(), **options)
    assert stats["fixed_buffer_sends"] == 0 and stats["pinned_bytes"] == 0
    if "zerocopy" in options:
        assert stats["zc_sends"] == 0


@needs_zc
def test_buffers_beyond_the_pool_get_their_own_memory_and_still_work():
    async def main():
        loop = asyncio.get_running_loop()
        server, sink, writer = await tcp_pair()
        inside = loop.alloc_zerocopy_buffer(200_000)
        outside = loop.alloc_zerocopy_buffer(400_000)  # the pool is 256 KiB
        assert inside.registered and not outside.registered
        for buf, fill in ((inside, b"i"), (outside, b"o")):
            memoryview(buf)[:] = fill * len(buf)
            writer.transport.write(buf)
        await asyncio.wait_for(asyncio.gather(inside.released, outside.released), 10)
        await until(lambda: len(sink.data) >= 600_000, "the data")
        assert sink.data == b"i" * 200_000 + b"o" * 400_000
        await teardown(server, sink, writer)
        return loop.zerocopy_stats()

    stats = run(main(), zerocopy="always", zc_pool_size=256 << 10)
    assert stats["registered_pool_bytes"] == 256 << 10
    assert stats["fixed_buffer_sends"] >= 1 and stats["zc_sends"] >= 2


@needs_zc
@pytest.mark.parametrize("how", ["abort", "loop_close"])
def test_lent_buffers_outlive_abort_and_loop_close(how):
    """The kernel may read a buffer until its notification: nothing frees it before."""
    loop = uringloop.new_event_loop(zerocopy="always")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    async def main():
        transport, writer = await loop.create_connection(Writer, *listener.getsockname())
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        buffers = []
        for i in range(6):
            buf = loop.alloc_zerocopy_buffer(1 << 20)
            memoryview(buf)[:] = bytes([i]) * len(buf)
            transport.write(buf)
            buffers.append(buf)
        await until(lambda: loop.zerocopy_stats()["pinned_bytes"] > 0, "a SEND_ZC in flight")
        await asyncio.sleep(0.05)
        if how == "abort":
            transport.abort()
            await asyncio.wait_for(asyncio.gather(*(b.released for b in buffers)), 10)
        return buffers, transport

    buffers, transport = loop.run_until_complete(main())
    peer, _ = listener.accept()
    with peer, listener:
        loop.close()
        stats = loop._ring.zerocopy_stats()
        assert stats["pinned_bytes"] == 0 and loop._ring.inflight == 0
        assert not any(b.lent for b in buffers)
        # the memory is still the buffers', readable and whole
        assert [bytes(memoryview(b)[:4]) for b in buffers] == [bytes([i]) * 4 for i in range(6)]
        del buffers
        gc.collect()
        assert loop._ring.zerocopy_stats()["zerocopy_buffer_bytes"] == 0


@needs_zc
def test_loop_wide_pinned_limit_pauses_writers_until_notifications_come_back():
    async def main():
        loop = asyncio.get_running_loop()
        server, sink, writer = await tcp_pair()
        sink.transport.pause_reading()  # no ACK for what fills the window: memory stays lent
        chunk = bytes(256 << 10)
        deadline = loop.time() + 20
        while not writer.paused:
            assert loop.time() < deadline, loop.zerocopy_stats()
            writer.transport.write(chunk)
            await asyncio.sleep(0.001)
        assert loop.zerocopy_stats()["pinned_bytes"] > 0
        sink.transport.resume_reading()
        await until(lambda: writer.resumed, "resume_writing")
        await until(lambda: loop.zerocopy_stats()["pinned_bytes"] == 0, "all notifications")
        await teardown(server, sink, writer)
        return loop.zerocopy_stats()

    # a high write-buffer mark so that only the pinned bound can pause the writer
    async def with_big_marks():
        loop = asyncio.get_running_loop()
        original = loop.create_connection

        async def create_connection(*args, **kwargs):
            transport, proto = await original(*args, **kwargs)
            transport.set_write_buffer_limits(high=64 << 20)
            return transport, proto

        loop.create_connection = create_connection
        return await main()

    stats = run(
        with_big_marks(),
        zerocopy="always",
        zc_pinned_limit=1 << 20,
        zc_transport_pinned_limit=64 << 20,
    )
    assert stats["zc_sends"] == stats["zc_notifications"] > 0


def test_bad_memory_bound_options_are_rejected():
    with pytest.raises(ValueError):
        uringloop.new_event_loop(zc_pinned_limit=-1)
    with pytest.raises(TypeError):
        uringloop.new_event_loop(zc_pool_size="big")
    with pytest.raises(ValueError):
        uringloop.new_event_loop(zc_transport_pinned_limit=-5)


@needs_zc
def test_memlock_limit_refusing_send_zc_falls_back_to_copying():
    """Unprivileged users' SEND_ZC pins count against RLIMIT_MEMLOCK (ENOMEM past it)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "memlock_child.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the registered pool shrank to what the limit allows, and still works
    assert 0 < result["pool_bytes"] < 1 << 20 and result["buffer_registered"]
    assert result["transport_intact"] and result["sendzc_intact"]
    assert result["sendzc_sent"] == 2 << 20
    stats = result["stats"]
    assert stats["copy_fallback_sockets"] >= 1  # the transport switched to copying
    assert stats["zc_notifications"] == stats["zc_sends"]
    assert stats["pinned_bytes"] == 0
