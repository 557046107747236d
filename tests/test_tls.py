"""TLS over the ring's stream transports: asyncio's sslproto on RingStreamTransport.

TLS records are encrypted in user space, so nothing here can go zero-copy; these
tests check that the TLS paths behave as on asyncio's loop.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile

import pytest


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def tls_echo_server(server_ctx, **kwargs):
    loop = asyncio.get_running_loop()
    return await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_ctx, **kwargs)


@pytest.mark.asyncio
async def test_tls_echo_of_small_and_large_messages(tls_contexts):
    server_ctx, client_ctx = tls_contexts
    server = await tls_echo_server(server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").version().startswith("TLS")
    assert writer.get_extra_info("peercert")["subject"]
    async with server:
        for size in (1, 1000, 300_000):
            payload = os.urandom(size)
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(size), 10) == payload
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_tls_refuses_a_certificate_it_cannot_verify(tls_contexts):
    server_ctx, _ = tls_contexts
    server = await tls_echo_server(server_ctx)
    port = server.sockets[0].getsockname()[1]
    strict = ssl.create_default_context()  # the system CAs do not know the test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection("127.0.0.1", port, ssl=strict, server_hostname="localhost")
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_start_tls_upgrades_a_plain_connection(tls_contexts):
    server_ctx, client_ctx = tls_contexts
    loop = asyncio.get_running_loop()
    upgraded = loop.create_future()

    async def handle(reader, writer):
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(server_ctx)
        upgraded.set_result(True)
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"STARTTLS\n")
    assert await reader.readline() == b"GO\n"
    await writer.start_tls(client_ctx, server_hostname="localhost")
    async with server:
        writer.write(b"secret\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"SECRET\n"
        assert await upgraded
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_tls_handshake_timeout(tls_contexts):
    _, client_ctx = tls_contexts
    loop = asyncio.get_running_loop()
    # a server that accepts and never answers the ClientHello
    silent = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    with pytest.raises((TimeoutError, ConnectionAbortedError)):
        await loop.create_connection(
            asyncio.Protocol,
            "127.0.0.1",
            port,
            ssl=client_ctx,
            server_hostname="localhost",
            ssl_handshake_timeout=0.3,
        )
    silent.close()
    await silent.wait_closed()


@pytest.mark.asyncio(loop_factories=["asyncio", "uringloop"])
async def test_sendfile_over_tls_falls_back_and_delivers(tls_contexts):
    # not on uvloop: it has no loop.sendfile
    server_ctx, client_ctx = tls_contexts
    loop = asyncio.get_running_loop()
    got = bytearray()
    done = loop.create_future()

    async def handle(reader, writer):
        while chunk := await reader.read(1 << 16):
            got.extend(chunk)
        done.set_result(None)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
    )
    data = os.urandom(1_000_000)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        assert await loop.sendfile(writer.transport, f) == len(data)
    writer.close()
    await asyncio.wait_for(done, 10)
    assert bytes(got) == data
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_tls_shutdown_timeout_is_accepted(tls_contexts):
    server_ctx, client_ctx = tls_contexts
    server = await tls_echo_server(server_ctx, ssl_shutdown_timeout=1.0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(
        asyncio.Protocol,
        "127.0.0.1",
        port,
        ssl=client_ctx,
        server_hostname="localhost",
        ssl_shutdown_timeout=1.0,
    )
    transport.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("peer", ["closes", "shuts-down"])
@pytest.mark.parametrize("name", ["asyncio", "uvloop", "uringloop"])
def test_unclean_close_keeps_no_reference_to_the_ssl_context(name, peer, tls_contexts):
    """A request still in the kernel may keep memory, never the transport or protocol.

    As CPython's test_shutdown_timeout_handler_leak, but the context must be gone as
    soon as connection_lost() ran, without another loop iteration.
    """
    import gc
    import socket
    import threading
    import weakref

    from conftest import _factories

    factories = _factories()
    if name not in factories:
        pytest.skip("uvloop has no wheel for this interpreter")
    server_ctx, _ = tls_contexts
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        tls = server_ctx.wrap_socket(conn, server_side=True)
        tls.recv(32)
        if peer == "shuts-down":
            tls.shutdown(socket.SHUT_RDWR)  # FIN without close_notify
        tls.close()

    thread = threading.Thread(target=serve)
    thread.start()
    loop = factories[name]()

    class Proto(asyncio.Protocol):
        def __init__(self):
            self.fut = loop.create_future()

        def connection_lost(self, exc):
            self.fut.set_result(None)

    async def client(ctx):
        tr, pr = await loop.create_connection(
            Proto, *listener.getsockname(), ssl=ctx, server_hostname="localhost"
        )
        tr.write(b"hello")
        await asyncio.sleep(0.05)
        tr.close()
        await pr.fut

    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.load_verify_locations(os.path.join(os.path.dirname(__file__), "certs", "ca.pem"))
    try:
        loop.run_until_complete(asyncio.wait_for(client(ctx), 20))
        ref = weakref.ref(ctx)
        del ctx
        gc.collect()
        gc.collect()
        assert ref() is None, gc.get_referrers(ref())
    finally:
        loop.close()
        thread.join(10)
        listener.close()
