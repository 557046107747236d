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
