"""UDP and Unix datagram endpoints, and the datagram socket methods, on all three loops."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import has_ipv6_loopback


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.errors: asyncio.Queue = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr))

    def error_received(self, exc):
        self.errors.put_nowait(exc)

    def connection_lost(self, exc):
        self.closed.set_result(exc)


class Echo(Datagrams):
    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_udp_echo_local_and_remote_addr(host):
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET6 and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    server, _ = await loop.create_datagram_endpoint(Echo, local_addr=(host, 0), family=family)
    addr = server.get_extra_info("sockname")
    client, proto = await loop.create_datagram_endpoint(Datagrams, remote_addr=addr[:2])
    for size in (1, 1400, 60000):
        payload = bytes([size % 251]) * size
        client.sendto(payload)
        data, src = await asyncio.wait_for(proto.queue.get(), 5)
        assert data == payload
        assert src[:2] == addr[:2]
    assert client.get_write_buffer_size() == 0
    client.close()
    server.close()
    assert await asyncio.wait_for(proto.closed, 5) is None


@pytest.mark.asyncio
async def test_udp_reuse_port_and_broadcast():
    loop = asyncio.get_running_loop()
    a, _ = await loop.create_datagram_endpoint(
        Datagrams, local_addr=("127.0.0.1", 0), reuse_port=True
    )
    port = a.get_extra_info("sockname")[1]
    b, _ = await loop.create_datagram_endpoint(
        Datagrams, local_addr=("127.0.0.1", port), reuse_port=True
    )
    c, _ = await loop.create_datagram_endpoint(
        Datagrams, local_addr=("127.0.0.1", 0), allow_broadcast=True
    )
    sock = c.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
    for t in (a, b, c):
        t.close()


@pytest.mark.asyncio
async def test_udp_endpoint_on_an_existing_socket():
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    transport, proto = await loop.create_datagram_endpoint(Datagrams, sock=sock)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"hi", sock.getsockname())
        data, src = await asyncio.wait_for(proto.queue.get(), 5)
        assert data == b"hi" and src[1] == peer.getsockname()[1]
    transport.close()


@pytest.mark.asyncio(loop_factories=["asyncio", "uringloop"])
async def test_unix_datagram_endpoint(tmp_path):
    # not on uvloop: it takes only (host, port) addresses for datagram endpoints
    loop = asyncio.get_running_loop()
    path = str(tmp_path / "dgram")
    server, sproto = await loop.create_datagram_endpoint(
        Datagrams, local_addr=path, family=socket.AF_UNIX
    )
    client, _ = await loop.create_datagram_endpoint(
        Datagrams, remote_addr=path, family=socket.AF_UNIX
    )
    client.sendto(b"over unix")
    data, _ = await asyncio.wait_for(sproto.queue.get(), 5)
    assert data == b"over unix"
    client.close()
    server.close()


@pytest.mark.asyncio
async def test_connected_udp_reports_port_unreachable_to_error_received():
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()  # nobody listens once this closes
    client, proto = await loop.create_datagram_endpoint(Datagrams, remote_addr=dead)
    client.sendto(b"anyone?")
    exc = await asyncio.wait_for(proto.errors.get(), 5)
    assert isinstance(exc, ConnectionRefusedError)
    client.close()


@pytest.mark.asyncio
async def test_datagram_transport_errors_match_asyncio():
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(Datagrams, local_addr=("127.0.0.1", 0))
    with pytest.raises(TypeError):
        t.sendto("text", ("127.0.0.1", 9))
    t.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(ValueError):
            await loop.create_datagram_endpoint(Datagrams, local_addr=("127.0.0.1", 0), sock=udp)
    with socket.socket() as tcp:
        with pytest.raises(ValueError):
            await loop.create_datagram_endpoint(Datagrams, sock=tcp)


@pytest.mark.asyncio(loop_factories=["asyncio", "uringloop"])
async def test_sock_sendto_recvfrom_and_recvfrom_into():
    # not on uvloop: its sock_recvfrom raises NotImplementedError
    loop = asyncio.get_running_loop()
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        reader = asyncio.ensure_future(loop.sock_recvfrom(b, 4096))
        await asyncio.sleep(0)
        assert await loop.sock_sendto(a, b"first", b.getsockname()) == 5
        data, src = await asyncio.wait_for(reader, 5)
        assert data == b"first" and src == a.getsockname()
        buf = bytearray(100)
        await loop.sock_sendto(a, b"second", b.getsockname())
        n, src = await asyncio.wait_for(loop.sock_recvfrom_into(b, buf), 5)
        assert bytes(buf[:n]) == b"second" and src == a.getsockname()
        await loop.sock_sendto(a, b"third!", b.getsockname())
        n, _ = await asyncio.wait_for(loop.sock_recvfrom_into(b, buf, 3), 5)
        assert n == 3 and bytes(buf[:3]) == b"thi"
