"""Servers and connection set-up: the same behaviour on asyncio, uvloop and uringloop."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import free_port, has_ipv6_loopback


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def roundtrip(host: str, port: int, payload: bytes = b"ping", **kwargs) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, **kwargs)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_server_on_several_hosts_serves_each(fd_leak_check):
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    loop = asyncio.get_running_loop()
    port = free_port()
    server = await loop.create_server(Echo, ["127.0.0.1", "::1"], port, reuse_address=True)
    assert {s.family for s in server.sockets} == {socket.AF_INET, socket.AF_INET6}
    assert await roundtrip("127.0.0.1", port) == b"ping"
    assert await roundtrip("::1", port, b"pong") == b"pong"
    server.close()
    await server.wait_closed()
    assert not server.is_serving()


@pytest.mark.asyncio
async def test_start_serving_false_then_serve_forever_and_close(fd_leak_check):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, start_serving=False, backlog=5)
    assert not server.is_serving()
    port = server.sockets[0].getsockname()[1]
    serving = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0)
    assert server.is_serving()
    assert await roundtrip("127.0.0.1", port, b"x" * 100_000) == b"x" * 100_000
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert not server.is_serving()
    await server.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.asyncio
async def test_reuse_port_lets_two_servers_share_a_port(fd_leak_check):
    loop = asyncio.get_running_loop()
    first = await loop.create_server(Echo, "127.0.0.1", 0, reuse_port=True)
    port = first.sockets[0].getsockname()[1]
    second = await loop.create_server(Echo, "127.0.0.1", port, reuse_port=True)
    assert second.sockets[0].getsockname()[1] == port
    for _ in range(8):
        assert await roundtrip("127.0.0.1", port) == b"ping"
    first.close()
    second.close()
    await first.wait_closed()
    await second.wait_closed()


@pytest.mark.asyncio
async def test_server_from_a_listening_socket(fd_leak_check):
    loop = asyncio.get_running_loop()
    sock = socket.create_server(("127.0.0.1", 0))
    server = await loop.create_server(Echo, sock=sock)
    port = sock.getsockname()[1]
    assert await roundtrip("127.0.0.1", port) == b"ping"
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_async_with_server_closes_it(fd_leak_check):
    loop = asyncio.get_running_loop()
    async with await loop.create_server(Echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        assert await roundtrip("127.0.0.1", port) == b"ping"
    await server.wait_closed()
    assert not server.is_serving()


@pytest.mark.asyncio
async def test_create_connection_from_socket_and_local_addr(fd_leak_check):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    local_port = free_port()
    got = asyncio.get_running_loop().create_future()

    class Client(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"hello")

        def data_received(self, data):
            got.set_result(data)

    transport, _ = await loop.create_connection(
        Client, "127.0.0.1", port, local_addr=("127.0.0.1", local_port)
    )
    assert transport.get_extra_info("sockname") == ("127.0.0.1", local_port)
    assert transport.get_extra_info("peercert") is None
    assert await asyncio.wait_for(got, 10) == b"hello"
    transport.close()

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    got = asyncio.get_running_loop().create_future()
    transport, _ = await loop.create_connection(Client, sock=sock)
    assert transport.get_extra_info("socket").fileno() == sock.fileno()
    assert await asyncio.wait_for(got, 10) == b"hello"
    transport.close()
    await asyncio.sleep(0.01)
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_happy_eyeballs_connects_to_the_address_that_answers(fd_leak_check):
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        pytest.skip("uvloop resolves inside libuv, not through loop.getaddrinfo")
    server = await loop.create_server(Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    real_getaddrinfo = loop.getaddrinfo

    async def two_families(host, port, *, family=0, type=0, proto=0, flags=0):
        # "both.test" resolves to ::1 (nobody listens there) and 127.0.0.1
        if host == "both.test":
            v6 = await real_getaddrinfo("::1", port, family=socket.AF_INET6, type=type)
            v4 = await real_getaddrinfo("127.0.0.1", port, family=socket.AF_INET, type=type)
            return v6 + v4
        return await real_getaddrinfo(
            host, port, family=family, type=type, proto=proto, flags=flags
        )

    loop.getaddrinfo = two_families
    try:
        transport, _ = await loop.create_connection(
            asyncio.Protocol, "both.test", port, happy_eyeballs_delay=0.05
        )
    finally:
        del loop.getaddrinfo
    assert transport.get_extra_info("peername") == ("127.0.0.1", port)
    transport.close()
    await asyncio.sleep(0.01)
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_unix_server_and_connection(tmp_path, fd_leak_check):
    loop = asyncio.get_running_loop()
    path = str(tmp_path / "echo.sock")
    server = await loop.create_unix_server(Echo, path)
    reader, writer = await asyncio.open_unix_connection(path)
    assert writer.get_extra_info("peername") == path
    writer.write(b"y" * 300_000)
    assert await asyncio.wait_for(reader.readexactly(300_000), 10) == b"y" * 300_000
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_connect_accepted_socket(fd_leak_check):
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    accepted.setblocking(False)
    transport, proto = await loop.connect_accepted_socket(Echo, accepted)
    with client:
        client.settimeout(10)
        # a blocking client: in a thread, so the loop under test keeps running
        await asyncio.to_thread(client.sendall, b"accepted")
        assert await asyncio.to_thread(client.recv, 100) == b"accepted"
    transport.close()
    await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_connection_lost_reports_the_error_after_peer_reset_while_writing(fd_leak_check):
    """EPIPE/ECONNRESET from a send: connection_lost gets a ConnectionError, not None."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    lost = loop.create_future()

    class Writer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def connection_lost(self, exc):
            lost.set_result(exc)

    with listener:
        transport, proto = await loop.create_connection(Writer, *listener.getsockname())
        peer, _ = listener.accept()
    # the peer resets the connection at once (SO_LINGER 0)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()
    deadline = loop.time() + 10
    while not lost.done():
        assert loop.time() < deadline, "connection_lost never came"
        transport.write(b"z" * 65536)
        await asyncio.sleep(0.001)
    exc = lost.result()
    assert isinstance(exc, (BrokenPipeError, ConnectionResetError)), exc
    assert transport.is_closing()
