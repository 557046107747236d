"""Protocol callbacks run in the contextvars context asyncio gives them.

asyncio runs the protocol factory, connection_made and the read callbacks
(data_received / get_buffer / buffer_updated, eof_received) in copies of the context
that was current when the server or connection was made (reads: when reading last
started, i.e. at creation or resume_reading()); connection_lost runs in a copy of
the context that closed the transport. Request-scoped logging and tracing rely on
it. Each scenario runs on asyncio's loop first, then on the loop under test, and the
two records must be equal.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import ssl

import pytest

import uringloop

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")
counter: contextvars.ContextVar[int] = contextvars.ContextVar("counter", default=0)

# uvloop is not compared: it runs connection_made in the read callbacks' context and
# keeps that context across resume_reading(), unlike asyncio
LOOPS = {
    "uringloop": uringloop.new_event_loop,
    "uringloop-single-shot": lambda: uringloop.new_event_loop(recv_multishot=False),
}
CERTS = os.path.join(os.path.dirname(__file__), "certs")


class Recorder:
    """Records (callback, request_id, counter) for one side of a connection."""

    def __init__(self, log: list) -> None:
        self.log = log

    def note(self, what: str) -> None:
        self.log.append((what, request_id.get(), counter.get()))


class Traced(asyncio.Protocol):
    def __init__(self, log: list, name: str) -> None:
        self.rec = Recorder(log)
        self.name = name
        self.rec.note(f"{name}.factory")
        self.lost = asyncio.get_running_loop().create_future()
        self.got = 0
        self.keep_open = False

    def connection_made(self, transport):
        self.transport = transport
        self.rec.note(f"{self.name}.connection_made")
        counter.set(100)  # asyncio: invisible to the read callbacks (another copy)

    def data_received(self, data):
        self.got += len(data)
        self.rec.note(f"{self.name}.data_received")
        counter.set(counter.get() + 1)  # asyncio: seen by the next read callback

    def eof_received(self):
        self.rec.note(f"{self.name}.eof_received")
        return self.keep_open

    def connection_lost(self, exc):
        self.rec.note(f"{self.name}.connection_lost")
        self.lost.set_result(None)


class TracedBuffered(Traced, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint):
        self.rec.note(f"{self.name}.get_buffer")
        return bytearray(1 << 16)

    def buffer_updated(self, nbytes):
        self.got += nbytes
        self.rec.note(f"{self.name}.buffer_updated")
        counter.set(counter.get() + 1)


def _dedupe(log: list) -> dict:
    """Each side's record on its own (how the two sides interleave is scheduling, not
    context), with consecutive identical entries once (how data is split into calls
    differs by loop)."""
    sides: dict[str, list] = {}
    for entry in log:
        if entry[0].endswith(".get_buffer"):
            # a completion-based loop asks for the buffer before the data is there (the
            # kernel needs it then); asyncio only once it is readable: compared apart
            sides.setdefault("get_buffer contexts", set()).add(entry[1])
            continue
        out = sides.setdefault(entry[0].split(".")[0], [])
        if not out or out[-1] != entry:
            out.append(entry)
    return sides  # type: ignore[return-value]


async def _wait(pred, timeout=10):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline
        await asyncio.sleep(0.001)


async def stream_scenario(kind: str, family: str, tmp: str) -> list:
    loop = asyncio.get_running_loop()
    log: list = []
    proto = TracedBuffered if kind == "buffered" else Traced
    servers: list[Traced] = []
    path = os.path.join(tmp, "ctx.sock")

    async def start_server():
        request_id.set("server")

        def factory():
            servers.append(proto(log, "server"))
            return servers[-1]

        if family == "unix":
            return await loop.create_unix_server(factory, path)
        return await loop.create_server(factory, "127.0.0.1", 0)

    async def connect(server):
        request_id.set("client")
        if family == "unix":
            return await loop.create_unix_connection(lambda: proto(log, "client"), path)
        return await loop.create_connection(
            lambda: proto(log, "client"), *server.sockets[0].getsockname()
        )

    server = await asyncio.create_task(start_server())
    _, client = await asyncio.create_task(connect(server))
    await _wait(lambda: servers)
    srv = servers[0]
    for i in range(3):
        client.transport.write(b"ping %d" % i)
        await _wait(lambda i=i: srv.got >= 6 * (i + 1))
        srv.transport.write(b"pong %d" % i)
        await _wait(lambda i=i: client.got >= 6 * (i + 1))

    async def pause_and_resume():
        request_id.set("resumer")
        srv.transport.pause_reading()
        client.transport.write(b"after resume")
        await asyncio.sleep(0.01)
        srv.transport.resume_reading()

    await asyncio.create_task(pause_and_resume())
    await _wait(lambda: srv.got >= 18 + 12)
    # the server keeps its side open after EOF: closing it there would race its FIN
    # against the client's close() (an eof_received() on the client, or not)
    srv.keep_open = True
    client.transport.write_eof()
    await _wait(lambda: any(e[0] == "server.eof_received" for e in log))

    async def close_client():
        request_id.set("closer")
        client.transport.close()

    await asyncio.create_task(close_client())
    await asyncio.wait_for(client.lost, 10)

    async def close_server_side():
        request_id.set("server-closer")
        srv.transport.close()

    await asyncio.create_task(close_server_side())
    await asyncio.wait_for(srv.lost, 10)
    server.close()
    await server.wait_closed()
    return _dedupe(log)


async def accepted_socket_scenario() -> list:
    loop = asyncio.get_running_loop()
    log: list = []
    a, b = socket.socketpair()

    async def adopt():
        request_id.set("adopter")
        return await loop.connect_accepted_socket(lambda: Traced(log, "adopted"), a)

    t, p = await asyncio.create_task(adopt())
    b.sendall(b"hello")
    await _wait(lambda: p.got >= 5)
    b.close()
    await asyncio.wait_for(p.lost, 10)
    return _dedupe(log)


async def tls_scenario() -> list:
    loop = asyncio.get_running_loop()
    log: list = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(os.path.join(CERTS, "keycert.pem"))
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client_ctx.load_verify_locations(os.path.join(CERTS, "ca.pem"))
    servers: list[Traced] = []

    async def start_server():
        request_id.set("tls-server")

        def factory():
            servers.append(Traced(log, "server"))
            return servers[-1]

        return await loop.create_server(factory, "127.0.0.1", 0, ssl=server_ctx)

    server = await asyncio.create_task(start_server())

    async def connect():
        request_id.set("tls-client")
        return await loop.create_connection(
            lambda: Traced(log, "client"),
            *server.sockets[0].getsockname(),
            ssl=client_ctx,
            server_hostname="localhost",
        )

    _, client = await asyncio.create_task(connect())
    await _wait(lambda: servers and hasattr(servers[0], "transport"))
    client.transport.write(b"secret")
    await _wait(lambda: servers[0].got >= 6)

    async def close_client():
        request_id.set("tls-closer")
        client.transport.close()

    await asyncio.create_task(close_client())
    await asyncio.wait_for(asyncio.gather(servers[0].lost, client.lost), 10)
    server.close()
    await server.wait_closed()
    return _dedupe(log)


async def start_tls_scenario() -> list:
    loop = asyncio.get_running_loop()
    log: list = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(os.path.join(CERTS, "keycert.pem"))
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client_ctx.load_verify_locations(os.path.join(CERTS, "ca.pem"))
    upgraded = loop.create_future()

    async def handle(reader, writer):
        request_id.set("handler")
        await writer.start_tls(server_ctx)
        upgraded.set_result(await reader.read(6))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    _, client = await loop.create_connection(
        lambda: Traced(log, "plain"), *server.sockets[0].getsockname()
    )

    async def upgrade():
        request_id.set("upgrader")
        return await loop.start_tls(
            client.transport, client, client_ctx, server_hostname="localhost"
        )

    tls = await asyncio.create_task(upgrade())
    tls.write(b"secret")
    assert await asyncio.wait_for(upgraded, 10) == b"secret"
    await asyncio.wait_for(client.lost, 10)
    server.close()
    await server.wait_closed()
    return _dedupe(log)


SCENARIOS = {
    "tcp-plain": lambda tmp: stream_scenario("plain", "tcp", tmp),
    "tcp-buffered": lambda tmp: stream_scenario("buffered", "tcp", tmp),
    "unix-plain": lambda tmp: stream_scenario("plain", "unix", tmp),
    "connect_accepted_socket": lambda tmp: accepted_socket_scenario(),
    "tls": lambda tmp: tls_scenario(),
    "start_tls": lambda tmp: start_tls_scenario(),
}


def _run(factory, scenario, tmp):
    loop = factory()
    try:
        # the outermost context: whatever a callback sees without the right context
        return contextvars.Context().run(loop.run_until_complete, scenario(tmp))
    finally:
        loop.close()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", list(LOOPS))
def test_protocol_callbacks_see_the_context_asyncio_gives_them(name, scenario, tmp_path):
    expected = _run(asyncio.SelectorEventLoop, SCENARIOS[scenario], str(tmp_path))
    # the scenario means something
    assert any(rid != "unset" for side in expected.values() for _, rid, _ in side)
    got = _run(LOOPS[name], SCENARIOS[scenario], str(tmp_path))
    got_buffers = got.pop("get_buffer contexts", set())
    expected_buffers = expected.pop("get_buffer contexts", set())
    assert got == expected
    # get_buffer() too runs in a context asyncio's callbacks see, only sometimes earlier
    seen = expected_buffers | {entry[1] for side in expected.values() for entry in side}
    assert got_buffers <= seen
