"""Low-level socket methods: the same results and errors on every loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest


def nonblocking_pair(family=socket.AF_UNIX):
    a, b = socket.socketpair(family)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def listener(family=socket.AF_INET, path=None):
    if family == socket.AF_UNIX:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
    else:
        srv = socket.socket(family)
        srv.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    return srv


async def tcp_connection(loop, host="127.0.0.1"):
    """(client, server side) connected through loop.sock_connect and loop.sock_accept."""
    srv = listener()
    client = socket.socket()
    client.setblocking(False)
    with srv:
        accept = asyncio.ensure_future(loop.sock_accept(srv))
        await loop.sock_connect(client, (host, srv.getsockname()[1]))
        conn, _ = await accept
    return client, conn


@pytest.mark.asyncio
async def test_recv_and_sendall_roundtrip(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = nonblocking_pair()
    with a, b:
        await loop.sock_sendall(a, b"ping")
        assert await loop.sock_recv(b, 100) == b"ping"
        await loop.sock_sendall(b, memoryview(b"xxpongxx")[2:6])
        buf = bytearray(10)
        n = await loop.sock_recv_into(a, buf)
        assert bytes(buf[:n]) == b"pong"
        await loop.sock_sendall(a, b"")
        a.close()
        assert await loop.sock_recv(b, 10) == b""


@pytest.mark.asyncio
async def test_sendall_of_megabytes_survives_short_sends(fd_leak_check):
    loop = asyncio.get_running_loop()
    payload = os.urandom(8 * 1024 * 1024)
    client, conn = await tcp_connection(loop)
    with client, conn:
        received = bytearray()

        async def reader():
            while len(received) < len(payload):
                chunk = await loop.sock_recv(conn, 1 << 16)
                assert chunk
                received.extend(chunk)

        await asyncio.gather(loop.sock_sendall(client, payload), reader())
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


@pytest.mark.asyncio
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX])
async def test_connect_and_accept_report_addresses(family, tmp_path, fd_leak_check):
    loop = asyncio.get_running_loop()
    path = str(tmp_path / "s.sock")
    srv = listener(family, path)
    client = socket.socket(family)
    client.setblocking(False)
    with srv, client:
        accept = asyncio.ensure_future(loop.sock_accept(srv))
        target = path if family == socket.AF_UNIX else srv.getsockname()
        await loop.sock_connect(client, target)
        conn, addr = await accept
        with conn:
            assert conn.gettimeout() == 0
            assert conn.family == family
            if family != socket.AF_UNIX:
                assert addr[:2] == client.getsockname()[:2]
            await loop.sock_sendall(conn, b"hello")
            assert await loop.sock_recv(client, 10) == b"hello"


@pytest.mark.asyncio
async def test_connect_refused_raises_connection_refused(fd_leak_check):
    loop = asyncio.get_running_loop()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    s = socket.socket()
    s.setblocking(False)
    with s, pytest.raises(ConnectionRefusedError):
        await loop.sock_connect(s, ("127.0.0.1", port))


@pytest.mark.asyncio
async def test_connect_resolves_host_names(fd_leak_check):
    client, conn = await tcp_connection(asyncio.get_running_loop(), "localhost")
    assert conn.getpeername() == client.getsockname()
    client.close()
    conn.close()


@pytest.mark.asyncio
async def test_bad_arguments_raise_like_asyncio(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = nonblocking_pair()
    with a, b:
        with pytest.raises(TypeError):
            await loop.sock_sendall(a, "text is not bytes")
        b.send(b"x")  # uvloop only looks at the buffer once data is there
        with pytest.raises(TypeError):
            await asyncio.wait_for(loop.sock_recv_into(a, b"immutable"), 5)


@pytest.mark.asyncio
async def test_blocking_socket_is_refused_in_debug_mode():
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        pytest.skip("uvloop does not check for blocking sockets (it would block forever here)")
    loop.set_debug(True)
    try:
        blocking = socket.socket()
        with blocking, pytest.raises(ValueError, match="non-blocking"):
            await loop.sock_recv(blocking, 1)
    finally:
        loop.set_debug(False)


@pytest.mark.asyncio
async def test_recv_on_reset_connection_raises(fd_leak_check):
    loop = asyncio.get_running_loop()
    client, conn = await tcp_connection(loop)
    with client:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST
        with pytest.raises(ConnectionResetError):
            await loop.sock_recv(client, 10)


@pytest.mark.asyncio
async def test_cancelled_recv_loses_no_data(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = nonblocking_pair()
    with a, b:
        for i in range(50):
            task = asyncio.ensure_future(loop.sock_recv(b, 100))
            await asyncio.sleep(0)
            a.send(b"%03d" % i)  # may land before or after the cancel reaches the kernel
            task.cancel()
            try:
                got = await task
            except asyncio.CancelledError:
                got = await asyncio.wait_for(loop.sock_recv(b, 100), 5)
            assert got == b"%03d" % i


@pytest.mark.asyncio
async def test_add_reader_is_level_triggered(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = nonblocking_pair()
    with a, b:
        got = []
        done = loop.create_future()

        def on_readable():
            got.append(b.recv(1))  # read one byte per wake-up, leave the rest
            if len(got) == 3:
                loop.remove_reader(b)
                done.set_result(None)

        loop.add_reader(b, on_readable)
        a.send(b"xyz")
        await asyncio.wait_for(done, 5)
        assert got == [b"x", b"y", b"z"]
        assert not loop.remove_reader(b)


@pytest.mark.asyncio
async def test_add_writer_and_modify(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = nonblocking_pair()
    with a, b:
        writable = loop.create_future()
        readable = loop.create_future()
        loop.add_writer(a, lambda: writable.done() or writable.set_result(True))
        await asyncio.wait_for(writable, 5)
        loop.add_reader(a, lambda: readable.done() or readable.set_result(a.recv(10)))
        loop.remove_writer(a)
        b.send(b"r")
        assert await asyncio.wait_for(readable, 5) == b"r"
        loop.remove_reader(a)


@pytest.mark.asyncio
@pytest.mark.parametrize("into", [False, True], ids=["sock_recv", "sock_recv_into"])
async def test_recv_cancelled_after_the_peer_sent_hands_the_bytes_to_the_next_recv(
    into, fd_leak_check
):
    """The kernel may have handed the byte to the cancelled receive already: it must go
    to the next receive on that socket, which must not wait for data that left."""
    loop = asyncio.get_running_loop()
    a, b = nonblocking_pair()

    async def recv(n):
        if not into:
            return await loop.sock_recv(b, n)
        buf = bytearray(n)
        return bytes(buf[: await loop.sock_recv_into(b, buf)])

    with a, b:
        for i in range(30):
            task = asyncio.ensure_future(recv(1))
            for _ in range(i % 3):  # the receive reaches the kernel after 0-2 iterations
                await asyncio.sleep(0)
            await loop.sock_sendall(a, b"%d" % (i % 10))
            task.cancel()
            try:
                got = await task
            except asyncio.CancelledError:
                got = await asyncio.wait_for(recv(1), 5)
            assert got == b"%d" % (i % 10), i


def _big_view(size: int) -> memoryview:
    """size bytes of zero pages (no memory is touched) ending in a marker."""
    import mmap

    m = mmap.mmap(-1, size)
    m[size - 8 :] = b"THE-END!"
    return memoryview(m)


def _count_until(sock: socket.socket, total: int, tail: bytearray) -> int:
    """Blocking reader for another thread: counts bytes, keeps the last 8."""
    sock.setblocking(True)
    sock.settimeout(60)
    buf = bytearray(1 << 20)
    got = 0
    while got < total:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
        tail[:] = (tail + buf[:n])[-8:]
    return got


FOUR_GIB = 1 << 32

# The 4 GiB sends check our own length arithmetic (32-bit SQE lengths, MAX_RW_COUNT):
# on uringloop only, as asyncio's and uvloop's 40 s of moving 8 GiB tell us nothing new.


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_sendall_of_four_gib_and_more_sends_everything(fd_leak_check):
    """An SQE's length is 32 bits and one send moves at most MAX_RW_COUNT bytes."""
    loop = asyncio.get_running_loop()
    size = FOUR_GIB + 16
    view = _big_view(size)
    client, conn = await tcp_connection(loop)
    tail = bytearray()
    with client, conn:
        reader = loop.run_in_executor(None, _count_until, conn, size, tail)
        await asyncio.wait_for(loop.sock_sendall(client, view), 120)
        assert await asyncio.wait_for(reader, 120) == size
        assert tail == b"THE-END!"
    view.release()


@pytest.mark.asyncio
async def test_recv_of_four_gib_returns_the_data_waiting(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = nonblocking_pair()
    with a, b:
        a.send(b"waiting")
        assert await asyncio.wait_for(loop.sock_recv(b, FOUR_GIB), 10) == b"waiting"
        a.send(b"again")
        buf = bytearray(FOUR_GIB + 1)  # zero pages until written
        assert await asyncio.wait_for(loop.sock_recv_into(b, buf), 10) == 5
        assert buf[:5] == b"again"
        del buf


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_transport_write_of_four_gib_and_more_arrives_whole(fd_leak_check):
    loop = asyncio.get_running_loop()
    size = FOUR_GIB + 1
    done = loop.create_future()

    class Counter(asyncio.Protocol):
        got = 0

        def data_received(self, data):
            self.got += len(data)
            if self.got >= size and not done.done():
                done.set_result(self.got)

    server = await loop.create_server(Counter, "127.0.0.1", 0)
    t, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname())
    t.write(bytes(size))  # calloc'd: zero pages, nothing touched
    assert await asyncio.wait_for(done, 120) == size
    t.close()
    server.close()
    await server.wait_closed()
