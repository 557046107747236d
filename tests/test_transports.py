"""Stream transports: the same behaviour on asyncio, uvloop and uringloop.

uringloop-only checks (zero-copy counters, pinned memory) are at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import sys

import pytest
from conftest import require_setup

import uringloop


class Collector(asyncio.Protocol):
    """Collects what arrives and how the connection ends."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        self.made = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.eof = False
        self.keep_open_on_eof = False
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport):
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data):
        self.data.extend(data)

    def eof_received(self):
        self.eof = True
        return self.keep_open_on_eof

    def pause_writing(self):
        self.paused += 1

    def resume_writing(self):
        self.resumed += 1

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


async def wait_for_len(proto: Collector, n: int, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(proto.data) < n:
        if loop.time() > deadline:
            raise AssertionError(f"got {len(proto.data)} of {n} bytes")
        await asyncio.sleep(0.001)


async def connected_pair(family=socket.AF_INET, path=None, server_proto=Collector):
    loop = asyncio.get_running_loop()
    server_side: list[asyncio.Protocol] = []

    def factory():
        p = server_proto()
        server_side.append(p)
        return p

    if family == socket.AF_UNIX:
        server = await loop.create_unix_server(factory, path)
        _, client = await loop.create_unix_connection(Collector, path)
    else:
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, client = await loop.create_connection(Collector, "127.0.0.1", port)
    while not server_side:
        await asyncio.sleep(0.001)
    await server_side[0].made
    return server, server_side[0], client


async def close_all(server, *protos):
    for p in protos:
        if p.transport is not None:
            p.transport.close()
    for p in protos:
        await asyncio.wait_for(p.lost, 10)
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_protocol_roundtrip_extra_info_and_clean_close(fd_leak_check):
    srv, server_p, client_p = await connected_pair()
    t = client_p.transport
    assert t.get_extra_info("peername") == srv.sockets[0].getsockname()
    assert t.get_extra_info("sockname") == server_p.transport.get_extra_info("peername")
    assert t.get_extra_info("socket").fileno() >= 0
    assert t.get_extra_info("nonexistent", "dflt") == "dflt"
    assert t.can_write_eof() and not t.is_closing()
    t.write(b"hello ")
    t.writelines([b"wor", bytearray(b"ld"), memoryview(b"!!")])
    await wait_for_len(server_p, 13)
    assert bytes(server_p.data) == b"hello world!!"
    t.close()
    assert t.is_closing()
    assert await asyncio.wait_for(client_p.lost, 10) is None
    await asyncio.wait_for(server_p.lost, 10)  # EOF closes the server side
    assert server_p.eof
    srv.close()
    await srv.wait_closed()


async def _integrity(family, path, conns, seed):
    rnd = random.Random(seed)
    pairs = [await connected_pair(family, path) for _ in range(conns)]
    expected = []
    for _, server_p, client_p in pairs:
        h = hashlib.sha256()
        total = 0
        for _ in range(40):
            size = rnd.choice([1, 7, 100, 1500, 4096, 65536, 65537, 300_000, 1 << 20, 4 << 20])
            chunk = rnd.randbytes(size)
            kind = rnd.randrange(4)
            if kind == 0:
                client_p.transport.write(chunk)
            elif kind == 1:
                client_p.transport.write(bytearray(chunk))
            elif kind == 2:
                client_p.transport.write(memoryview(chunk))
            else:
                half = size // 2
                client_p.transport.writelines([chunk[:half], bytearray(chunk[half:])])
            h.update(chunk)
            total += size
            if rnd.random() < 0.3:
                await asyncio.sleep(0)
        expected.append((server_p, total, h.digest()))
    for server_p, total, digest in expected:
        await wait_for_len(server_p, total, 60)
        assert len(server_p.data) == total
        assert hashlib.sha256(server_p.data).digest() == digest
    for srv, server_p, client_p in pairs:
        await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
async def test_random_writes_arrive_complete_and_in_order(family, tmp_path, fd_leak_check):
    await _integrity(family, str(tmp_path / "s.sock"), 4, seed=family)


@pytest.mark.asyncio
async def test_bytearray_mutated_after_write_arrives_with_old_content(fd_leak_check):
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        pytest.skip("uvloop sends a queued bytearray/memoryview as it is at send time")
    # asyncio 3.12+ queues a memoryview without copying it (only bytearray is copied)
    check_views = isinstance(loop, uringloop.UringEventLoop) or sys.version_info < (3, 12)
    srv, server_p, client_p = await connected_pair()
    total = 0
    for size in (10, 100_000, 2 << 20):
        buf = bytearray(b"a" * size)
        client_p.transport.write(buf)
        buf[:] = b"b" * size
        total += size
        if check_views:
            view_src = bytearray(b"c" * size)
            client_p.transport.write(memoryview(view_src))
            view_src[:] = b"d" * size
            total += size
    await wait_for_len(server_p, total)
    assert set(server_p.data) == ({ord("a"), ord("c")} if check_views else {ord("a")})
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_bad_writes_raise_like_asyncio(fd_leak_check):
    srv, server_p, client_p = await connected_pair()
    t = client_p.transport
    with pytest.raises(TypeError):
        t.write("text")
    with pytest.raises(TypeError):
        t.write(12)
    t.write(b"")
    t.write_eof()
    with pytest.raises(RuntimeError):
        t.write(b"after eof")
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_write_eof_half_closes(fd_leak_check):
    srv, server_p, client_p = await connected_pair()
    server_p.keep_open_on_eof = True
    client_p.transport.write(b"request")
    client_p.transport.write_eof()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not server_p.eof:
        assert loop.time() < deadline
        await asyncio.sleep(0.001)
    assert bytes(server_p.data) == b"request"
    # the other direction still works
    server_p.transport.write(b"response")
    await wait_for_len(client_p, 8)
    assert bytes(client_p.data) == b"response"
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_peer_that_stops_reading_pauses_writing(fd_leak_check):
    srv, server_p, client_p = await connected_pair()
    server_p.transport.pause_reading()
    assert not server_p.transport.is_reading()
    client_p.transport.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
    assert client_p.transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
    chunk = b"z" * 65536
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not client_p.paused:
        assert loop.time() < deadline, "pause_writing never came"
        client_p.transport.write(chunk)
        sent += len(chunk)
        await asyncio.sleep(0)
    assert client_p.transport.get_write_buffer_size() > 0
    received_while_paused = len(server_p.data)
    await asyncio.sleep(0.05)
    assert len(server_p.data) == received_while_paused  # nothing is read while paused
    server_p.transport.resume_reading()
    await wait_for_len(server_p, sent)
    deadline = loop.time() + 10
    while not client_p.resumed:
        assert loop.time() < deadline, "resume_writing never came"
        await asyncio.sleep(0.001)
    assert client_p.transport.get_write_buffer_size() == 0
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_large_write_goes_to_the_socket_at_once_like_asyncio(fd_leak_check):
    """A write past the high-water mark is offered to the kernel inside write(), as in
    asyncio and uvloop, so pause_writing() only comes when the kernel refuses the data."""
    srv, server_p, client_p = await connected_pair()
    t = client_p.transport
    t.set_write_buffer_limits(high=64 * 1024)
    payload = bytearray(random.Random(7).randbytes(300_000))  # mutable: never zero-copy
    t.write(payload)
    assert t.get_write_buffer_size() < len(payload)  # some of it left during write()
    t.write(b"tail")
    await wait_for_len(server_p, len(payload) + 4)
    assert server_p.data == payload + b"tail"
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_abort_with_large_writes_in_flight(fd_leak_check):
    srv, server_p, client_p = await connected_pair()
    server_p.transport.pause_reading()
    for _ in range(8):
        client_p.transport.write(b"q" * (1 << 20))
    await asyncio.sleep(0.01)
    client_p.transport.abort()
    assert client_p.transport.is_closing()
    assert await asyncio.wait_for(client_p.lost, 10) is None
    server_p.transport.resume_reading()
    exc = await asyncio.wait_for(server_p.lost, 10)
    assert exc is None or isinstance(exc, ConnectionResetError)
    srv.close()
    await srv.wait_closed()


@pytest.mark.asyncio
async def test_peer_reset_reports_connection_reset(fd_leak_check):
    srv, server_p, client_p = await connected_pair()
    sock = server_p.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server_p.transport.abort()
    exc = await asyncio.wait_for(client_p.lost, 10)
    assert isinstance(exc, ConnectionResetError)
    await asyncio.wait_for(server_p.lost, 10)
    srv.close()
    await srv.wait_closed()


class BufferedCollector(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(1000)
        self.data = bytearray()
        self.transport = None
        self.made = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.made.set_result(None)

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.data.extend(self.buf[:nbytes])

    def connection_lost(self, exc):
        self.lost.set_result(exc)


@pytest.mark.asyncio
async def test_buffered_protocol_receives_into_its_buffer(fd_leak_check):
    srv, server_p, client_p = await connected_pair(server_proto=BufferedCollector)
    payload = random.Random(3).randbytes(300_000)
    client_p.transport.write(payload)
    await wait_for_len(server_p, len(payload))
    assert bytes(server_p.data) == payload
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_streams_api_with_drain(fd_leak_check):
    async def handle(reader, writer):
        data = await reader.read()
        writer.write(hashlib.sha256(data).hexdigest().encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
    payload = random.Random(5).randbytes(3 << 20)
    for i in range(0, len(payload), 100_000):
        writer.write(payload[i : i + 100_000])
        await writer.drain()
    writer.write_eof()
    assert (await reader.read()).decode() == hashlib.sha256(payload).hexdigest()
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


# ---------------------------------------------------------------- uringloop only


def _run_on(loop, coro):
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _bulk(payloads):
    srv, server_p, client_p = await connected_pair()
    total = 0
    for p in payloads:
        client_p.transport.write(p)
        total += len(p)
    await wait_for_len(server_p, total)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.zerocopy_stats()["pinned_buffers"]:
        assert loop.time() < deadline, loop.zerocopy_stats()
        await asyncio.sleep(0.001)
    await close_all(srv, client_p, server_p)
    return loop.zerocopy_stats()


def test_large_writes_use_send_zc_and_each_gets_one_notification():
    if not uringloop.probe().send_zc_report_usage:
        pytest.skip("this kernel has no SEND_ZC with usage reports")
    loop = uringloop.UringEventLoop(zerocopy="always", zc_threshold=64 * 1024)
    stats = _run_on(loop, _bulk([bytes(1 << 20)] * 16 + [b"small"] * 10))
    assert stats["zc_sends"] >= 16
    assert stats["zc_notifications"] == stats["zc_sends"]
    # loopback delivers locally: the kernel reports it copied after all
    assert stats["zc_copied_notifications"] == stats["zc_notifications"]
    assert stats["copy_fallback_sockets"] == 0  # "always" keeps using SEND_ZC
    assert stats["pinned_buffers"] == 0 and stats["pinned_bytes"] == 0
    assert stats["copy_sends"] >= 1


def test_auto_mode_switches_a_copying_route_to_plain_sends():
    if not uringloop.probe().send_zc_report_usage:
        pytest.skip("this kernel has no SEND_ZC with usage reports")
    loop = uringloop.UringEventLoop(zerocopy="auto", zc_threshold=64 * 1024)

    async def main():
        stats = await _bulk([bytes(1 << 20)] * 4)
        assert stats["zc_notifications"] == stats["zc_sends"] >= 4
        # with the first few notifications in, the socket stops using zero-copy
        await asyncio.sleep(0)
        stats = await _bulk([bytes(1 << 20)] * 32)
        return stats

    stats = _run_on(loop, main())
    assert stats["copy_fallback_sockets"] >= 1
    # once switched, the rest of a socket's writes go out plainly (how many SEND_ZC went
    # before that depends on when the notifications came: short sends count too)
    assert stats["copy_bytes"] >= 1 << 20
    assert stats["pinned_bytes"] == 0


def test_never_mode_sends_everything_copied():
    loop = uringloop.UringEventLoop(zerocopy="never")
    stats = _run_on(loop, _bulk([bytes(1 << 20)] * 4))
    assert stats["zc_sends"] == 0 and stats["copy_bytes"] >= 4 << 20


def test_bad_zerocopy_options_are_value_errors():
    with pytest.raises(ValueError):
        uringloop.UringEventLoop(zerocopy="sometimes")
    with pytest.raises(ValueError):
        uringloop.UringEventLoop(zc_threshold=-5)


@pytest.mark.asyncio(loop_factories=["uringloop"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
async def test_sock_sendzc_returns_after_release_with_the_byte_count(family, fd_leak_check):
    loop = asyncio.get_running_loop()
    if family == socket.AF_UNIX:
        a, b = socket.socketpair()
    else:
        srv = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
        srv.close()
    a.setblocking(False)
    b.setblocking(False)
    payload = random.Random(9).randbytes(3 << 20)
    before = loop.zerocopy_stats()
    with a, b:
        received = bytearray()

        async def reader():
            while len(received) < len(payload):
                received.extend(await loop.sock_recv(b, 1 << 20))

        sent, _ = await asyncio.gather(loop.sock_sendzc(a, payload), reader())
        assert sent == len(payload)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    after = loop.zerocopy_stats()
    assert after["pinned_bytes"] == 0
    if family == socket.AF_INET and loop._ring.zc_supported:
        new_sends = after["zc_sends"] - before["zc_sends"]
        assert new_sends >= 1
        assert after["zc_notifications"] - before["zc_notifications"] == new_sends


async def _stalled_zc_pair():
    """A client whose SEND_ZC data sits unacknowledged: the peer's window is full."""
    srv, server_p, client_p = await connected_pair()
    server_p.transport.pause_reading()
    server_sock = server_p.transport.get_extra_info("socket")
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client_sock = client_p.transport.get_extra_info("socket")
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    loop = asyncio.get_running_loop()
    for _ in range(6):
        client_p.transport.write(bytes(1 << 20))
    deadline = loop.time() + 10
    while loop.zerocopy_stats()["zc_sends"] == 0 or client_p.transport.get_write_buffer_size():
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    # 6 MiB fit the 8 MiB send buffer: all of it is the kernel's, waiting for acks
    assert client_p.transport.get_write_buffer_size() == 0, "the writes never left the transport"
    return srv, server_p, client_p


def test_graceful_close_with_lingering_notifications_times_out_into_a_reset():
    if not uringloop.probe().send_zc_report_usage:
        pytest.skip("this kernel has no SEND_ZC with usage reports")
    loop = uringloop.UringEventLoop(zerocopy="always", zc_threshold=64 * 1024)
    loop._zc_linger_seconds = 0.3

    async def main():
        srv, server_p, client_p = await _stalled_zc_pair()
        assert loop.zerocopy_stats()["pinned_bytes"] > 0
        client_p.transport.close()
        assert await asyncio.wait_for(client_p.lost, 5) is None
        # the connection is reset after the linger timeout, and the kernel lets go
        deadline = loop.time() + 10
        while loop.zerocopy_stats()["pinned_bytes"]:
            assert loop.time() < deadline, loop.zerocopy_stats()
            await asyncio.sleep(0.01)
        stats = loop.zerocopy_stats()
        assert stats["zc_notifications"] == stats["zc_sends"]
        server_p.transport.abort()
        srv.close()
        await srv.wait_closed()

    _run_on(loop, main())


def test_loop_close_releases_pinned_memory_of_open_transports():
    if not uringloop.probe().send_zc_report_usage:
        pytest.skip("this kernel has no SEND_ZC with usage reports")
    loop = uringloop.UringEventLoop(zerocopy="always", zc_threshold=64 * 1024)
    # the peer: a plain socket that never reads, with a tiny window
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    async def main():
        _, client_p = await loop.create_connection(Collector, *listener.getsockname())
        client_sock = client_p.transport.get_extra_info("socket")
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        for _ in range(6):
            client_p.transport.write(bytes(1 << 20))
        deadline = loop.time() + 10
        while not loop.zerocopy_stats()["pinned_bytes"]:
            assert loop.time() < deadline, "SEND_ZC never went out"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        return client_p

    client_p = loop.run_until_complete(main())
    peer, _ = listener.accept()
    ring = loop._ring
    assert ring.zerocopy_stats()["pinned_bytes"] > 0  # the peer never ACKs it all
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")  # no "kept for the life of the process" warning
        loop.close()
    assert ring.zerocopy_stats()["pinned_bytes"] == 0
    assert ring.inflight == 0
    assert client_p.transport.get_extra_info("socket").fileno() == -1
    peer.close()
    listener.close()


@pytest.mark.asyncio
async def test_server_accepts_many_connections_and_stops_on_close(fd_leak_check):
    async def handle(reader, writer):
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=200)
    addr = server.sockets[0].getsockname()

    async def client(i):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"%04d" % i)
        got = await reader.readexactly(4)
        writer.close()
        await writer.wait_closed()
        return got

    results = await asyncio.gather(*(client(i) for i in range(100)))
    assert results == [b"%04d" % i for i in range(100)]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*addr)


# ------------------------------------------------------------ receive path


class PausingCollector(Collector):
    """Pauses reading after each data_received; the test resumes it."""

    def data_received(self, data):
        super().data_received(data)
        self.transport.pause_reading()


@pytest.mark.asyncio
async def test_data_and_eof_while_paused_arrive_in_order_after_resume(fd_leak_check):
    srv, server_p, client_p = await connected_pair(server_proto=PausingCollector)
    payload = random.Random(3).randbytes(3 << 20)
    client_p.transport.write(payload)
    client_p.transport.write_eof()
    server_p.keep_open_on_eof = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not server_p.eof:
        assert loop.time() < deadline, len(server_p.data)
        # EOF must not overtake data that was read before the protocol paused
        assert len(server_p.data) < len(payload) or not server_p.eof
        await asyncio.sleep(0.001)
        server_p.transport.resume_reading()
    assert bytes(server_p.data) == payload
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_pause_and_resume_in_one_iteration_loses_nothing(fd_leak_check):
    srv, server_p, client_p = await connected_pair()
    h = hashlib.sha256()
    total = 0
    rnd = random.Random(5)
    for _ in range(200):
        chunk = rnd.randbytes(rnd.choice([10, 1000, 20000]))
        client_p.transport.write(chunk)
        h.update(chunk)
        total += len(chunk)
        server_p.transport.pause_reading()
        await asyncio.sleep(0)
        server_p.transport.resume_reading()
    await wait_for_len(server_p, total)
    assert hashlib.sha256(server_p.data).digest() == h.digest()
    await close_all(srv, client_p, server_p)


class ResumeRecorder(PausingCollector):
    """Pauses after every delivery; notes whether data_received ran inside resume_reading()."""

    in_resume = False
    data_during_resume = 0

    def data_received(self, data):
        super().data_received(data)
        if self.in_resume:
            self.data_during_resume += 1


@pytest.mark.asyncio
async def test_resume_reading_delivers_held_data_from_the_loop_not_inline(fd_leak_check):
    """StreamReader resumes the transport, then creates the future that data wakes.

    Data read while paused, handed over inside resume_reading(), came before that
    future existed and left readexactly() waiting for ever (uvicorn's websockets).
    """
    srv, server_p, client_p = await connected_pair(server_proto=ResumeRecorder)
    payload = random.Random(7).randbytes(3 << 20)
    client_p.transport.write(payload)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(server_p.data) < len(payload):
        assert loop.time() < deadline, len(server_p.data)
        await asyncio.sleep(0.001)
        server_p.in_resume = True
        server_p.transport.resume_reading()
        server_p.in_resume = False
    assert server_p.data_during_resume == 0
    assert bytes(server_p.data) == payload
    await close_all(srv, client_p, server_p)


@pytest.mark.asyncio
async def test_stream_reader_readexactly_beyond_twice_its_limit(fd_leak_check):
    """readexactly(n) with n far above the reader's limit: pauses and resumes under it."""
    for size in (262_144, 300_000, 1_000_000):
        got = asyncio.get_running_loop().create_future()

        async def handle(reader, writer, size=size, got=got):
            try:
                got.set_result(await reader.readexactly(size))
            except Exception as exc:
                got.set_exception(exc)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=2**16)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = random.Random(size).randbytes(size)
        writer.write(payload)
        assert await asyncio.wait_for(got, 10) == payload
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("multishot", [True, False], ids=["multishot", "single-shot"])
def test_both_receive_modes_deliver_mixed_sizes_intact(multishot):
    loop = uringloop.new_event_loop(recv_multishot=multishot)
    _run_on(loop, _integrity(socket.AF_INET, None, 3, seed=11))


def test_multishot_receive_merges_a_batch_into_one_call():
    if not uringloop.probe().recv_multishot:
        pytest.skip("the kernel has no multishot recv")
    loop = uringloop.new_event_loop(recv_multishot=True)

    async def main():
        srv, server_p, client_p = await connected_pair()
        calls = 0
        original = server_p.data_received

        def counting(data):
            nonlocal calls
            calls += 1
            original(data)

        server_p.data_received = counting
        server_p.transport.set_protocol(server_p)  # re-read data_received
        sent = 0
        for i in range(300):
            client_p.transport.write(b"%05d" % i)  # one small send each iteration
            sent += 5
            await asyncio.sleep(0)
        await wait_for_len(server_p, sent)
        assert bytes(server_p.data) == b"".join(b"%05d" % i for i in range(300))
        info = loop.ring_info()
        await close_all(srv, client_p, server_p)
        return info, calls

    info, calls = _run_on(loop, main())
    assert info["recv_buffer_ring"] is True
    assert info["recv_multishot_cqes"] >= calls > 0
    assert info["recv_deliveries"] <= info["recv_multishot_cqes"]


def test_bulk_receives_copied_out_of_reused_buffers_arrive_exactly():
    """A one-connection 256 KiB echo goes through single-shot bulk receives, most of them
    partly filled: their bytes are copied out and the 256 KiB buffer is received into
    again (spare reuses). Every message must come back byte for byte."""
    loop = uringloop.new_event_loop()
    payload = bytes(range(256)) * 1024  # 256 KiB

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            assert type(data) is bytes
            self.transport.write(data)

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        before = loop._ring.stats()["recv_spare_reuses"]
        for i in range(40):
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            assert got == payload, i
        reuses = loop._ring.stats()["recv_spare_reuses"] - before
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return reuses

    try:
        assert loop.run_until_complete(main()) > 0
    finally:
        loop.close()


async def _close_with_unread_bytes() -> str:
    """Pause reading at once, let the peer send, close: how the peer sees the end."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        transport, _ = await loop.create_connection(Collector, *listener.getsockname())
        peer, _ = await accepting
    with peer:
        transport.pause_reading()  # (the receive armed at connection_made is in flight)
        await loop.sock_sendall(peer, b"never read" * 60)
        transport.close()
        try:
            while await asyncio.wait_for(loop.sock_recv(peer, 65536), 5):
                pass
            return "eof"
        except ConnectionResetError:
            return "reset"


SETUPS = ["defer", "coop", "plain"]
RECEIVES = pytest.mark.parametrize("multishot", [True, False], ids=["multishot", "single-shot"])


def ring_loop(setup: str, multishot: bool) -> uringloop.UringEventLoop:
    """A loop on that set-up rung, or a skip where the kernel (or its emulation) lacks it."""
    require_setup(setup)
    if multishot and not uringloop.probe().recv_multishot:
        pytest.skip("this kernel has no multishot receive")
    return uringloop.new_event_loop(setup=setup, recv_multishot=multishot)


@pytest.mark.parametrize("setup", SETUPS)
@RECEIVES
def test_close_with_bytes_the_protocol_never_got_resets_like_the_selector_loop(setup, multishot):
    """asyncio leaves bytes of a paused transport in the socket and its close() resets
    the connection. A receive already in the kernel may have taken them (on
    COOP_TASKRUN rings its cancel completes after the bytes came): uringloop counts
    them as unread, waits for that receive to end and resets too (the peer saw a FIN
    instead, found by running the suite under URINGLOOP_EMULATE_KERNEL=5.19)."""
    want = _run_on(asyncio.SelectorEventLoop(), _close_with_unread_bytes())
    assert want == "reset"
    for _ in range(5):  # the race goes both ways: every round must end the same
        assert _run_on(ring_loop(setup, multishot), _close_with_unread_bytes()) == want


class CloseOnFirstData(asyncio.Protocol):
    """Closes in data_received (a multishot receive is then still in the kernel: the
    socket waits for its end) and asks for something after connection_lost()."""

    after_lost = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.close()
        if self.after_lost is not None:
            asyncio.get_running_loop().call_soon(self.after_lost)


async def _late_bytes_after_close(rounds: int) -> list[str]:
    """The server closes on the first bytes; the client sends more once it did."""
    loop = asyncio.get_running_loop()
    client: list[socket.socket] = []
    proto = type("P", (CloseOnFirstData,), {"after_lost": lambda self: client[0].send(b"late")})
    server = await loop.create_server(proto, "127.0.0.1", 0)
    ends = []
    for _ in range(rounds):
        with socket.socket() as c:
            c.setblocking(False)
            client[:] = [c]
            await loop.sock_connect(c, server.sockets[0].getsockname())
            await loop.sock_sendall(c, b"request")
            try:
                while await asyncio.wait_for(loop.sock_recv(c, 65536), 5):
                    pass
                ends.append("eof")
            except ConnectionResetError:
                ends.append("reset")
    server.close()
    await server.wait_closed()
    return ends


@pytest.mark.parametrize("setup", SETUPS)
@RECEIVES
def test_bytes_the_peer_sends_after_close_come_after_the_end_of_stream(setup, multishot):
    """asyncio's close() sends the FIN at once and a late byte resets the connection
    after it: the peer reads the end of the stream. uringloop keeps a socket whose
    receive is still in the kernel, but shuts it down at once (the peer saw a reset)."""
    want = _run_on(asyncio.SelectorEventLoop(), _late_bytes_after_close(20))
    assert set(want) == {"eof"}
    assert _run_on(ring_loop(setup, multishot), _late_bytes_after_close(20)) == want


class RaisingProtocol(asyncio.Protocol):
    def data_received(self, data):
        raise ValueError("the protocol fails")


async def _protocol_raises_with_more_waiting() -> str:
    """512 KiB wait in the server's socket; data_received raises on the first chunk."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: None)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with socket.create_connection(listener.getsockname()) as c:
        c.sendall(b"x" * (512 << 10))
        server = await loop.create_server(RaisingProtocol, sock=listener)
        c.setblocking(False)
        try:
            while await asyncio.wait_for(loop.sock_recv(c, 65536), 5):
                pass
            end = "eof"
        except ConnectionResetError:
            end = "reset"
    server.close()
    await server.wait_closed()
    return end


@pytest.mark.parametrize("setup", SETUPS)
@RECEIVES
def test_a_protocol_that_raises_leaves_the_rest_unread_and_resets(setup, multishot):
    """asyncio reads 256 KiB, data_received raises, the transport closes with the rest
    unread: a reset. uringloop's batch had taken more than it delivered: counted as
    dropped, it resets too (the peer saw a FIN)."""
    want = _run_on(asyncio.SelectorEventLoop(), _protocol_raises_with_more_waiting())
    assert want == "reset"
    assert _run_on(ring_loop(setup, multishot), _protocol_raises_with_more_waiting()) == want


def test_a_forked_child_closes_its_copy_of_a_socket_kept_past_close():
    """A socket kept after close() (here: its SEND_ZC memory waits for notifications;
    likewise one waiting for a receive's end) is the parent's business: a child forked
    meanwhile closes its inherited descriptor at once (it never hears of the parent's
    completions, and would keep the connection open until it exits)."""
    import os

    if not uringloop.probe().send_zc_report_usage:
        pytest.skip("this kernel has no SEND_ZC with usage reports")
    loop = uringloop.UringEventLoop(zerocopy="always", zc_threshold=64 * 1024)

    async def main():
        srv, server_p, client_p = await _stalled_zc_pair()
        transport = client_p.transport
        transport.close()
        assert await asyncio.wait_for(client_p.lost, 5) is None
        sock = transport._lingering
        assert sock is not None, "the socket was not kept for its notifications"
        fd = sock.fileno()
        pid = os.fork()
        if pid == 0:
            ok = transport._lingering is None
            try:
                os.fstat(fd)
                ok = False
            except OSError:
                pass
            os._exit(0 if ok else 1)
        status = os.waitpid(pid, 0)[1]
        assert transport._lingering is sock  # (the parent's stays)
        server_p.transport.abort()
        transport.abort()
        srv.close()
        await srv.wait_closed()
        return status

    assert _run_on(loop, main()) == 0
