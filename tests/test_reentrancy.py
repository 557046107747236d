"""Callbacks that close, abort or pause while the loop is in the middle of something.

Each test runs on asyncio's loop, uvloop and uringloop (the conftest fixture) and
asserts what asyncio's loop does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import random
import socket
import time

import pytest

import uringloop


class Ended(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.eof = True

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


# ------------------------------------------------------------ write() then abort()


class RespondAndAbort(asyncio.Protocol):
    """A server that answers (an HTTP 101, an error page) and aborts at once."""

    def connection_made(self, transport):
        transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        transport.write(bytearray(b"x" * 3000))
        transport.abort()


@pytest.mark.asyncio
async def test_write_then_abort_in_one_callback_sends_what_was_written(fd_leak_check):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RespondAndAbort, "127.0.0.1", 0)
    _, client = await loop.create_connection(Ended, *server.sockets[0].getsockname())
    await asyncio.wait_for(client.lost, 10)
    assert bytes(client.data) == b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + (
        b"x" * 3000
    )
    server.close()
    await server.wait_closed()


class AnswerInDataReceivedAndAbort(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(b"bye " + data)
        self.transport.abort()


@pytest.mark.asyncio
async def test_write_then_abort_from_data_received(fd_leak_check):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(AnswerInDataReceivedAndAbort, "127.0.0.1", 0)
    t, client = await loop.create_connection(Ended, *server.sockets[0].getsockname())
    t.write(b"now")
    await asyncio.wait_for(client.lost, 10)
    assert bytes(client.data) == b"bye now"
    server.close()
    await server.wait_closed()


# ------------------------------------------------------------ fd numbers reused


class ClosingInGetBuffer(asyncio.BufferedProtocol):
    """Aborts from get_buffer() once it has received something, then a new socket
    takes the fd number in the same loop iteration."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.buf = bytearray(4096)
        self.received = 0
        self.lost = asyncio.get_running_loop().create_future()
        self.new_pairs: list[tuple[socket.socket, socket.socket]] = []

    def connection_made(self, transport):
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()

    def get_buffer(self, sizehint):
        if self.received and not self.transport.is_closing():
            getattr(self.transport, self.action)()
            # right after connection_lost closed the fd, sockets take the lowest numbers
            asyncio.get_running_loop().call_soon(self._take_fd_number)
        return self.buf

    def _take_fd_number(self):
        for _ in range(4):
            a, b = socket.socketpair()
            a.setblocking(False)
            self.new_pairs.append((a, b))
            if self.fd in (a.fileno(), b.fileno()):
                break

    def buffer_updated(self, nbytes):
        self.received += nbytes

    def connection_lost(self, exc):
        self.lost.set_result(exc)


# not on uvloop: a get_buffer() that closes the transport leaves uvloop's loop.close()
# waiting for ever (uvloop 0.23)
@pytest.mark.asyncio(loop_factories=["asyncio", "uringloop"])
@pytest.mark.parametrize("action", ["abort", "close"])
async def test_receive_armed_after_get_buffer_closed_does_not_read_a_reused_fd(action):
    loop = asyncio.get_running_loop()
    protos = []

    def factory():
        protos.append(ClosingInGetBuffer(action))
        return protos[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    t, _ = await loop.create_connection(Ended, *server.sockets[0].getsockname())
    t.write(b"first")
    while not protos or not protos[0].received:
        await asyncio.sleep(0.001)
    # asyncio's loop asks for a buffer only when more data is there (uringloop at once,
    # to arm the next receive): more data makes get_buffer() act on every loop
    t.write(b"second")
    proto = protos[0]
    await asyncio.wait_for(proto.lost, 10)
    while not proto.new_pairs:
        await asyncio.sleep(0.001)
    try:
        # whichever new socket got the old number: its data is its own
        for a, b in proto.new_pairs:
            b.sendall(b"for the new socket")
            got = await asyncio.wait_for(loop.sock_recv(a, 100), 5)
            assert got == b"for the new socket"
    finally:
        for a, b in proto.new_pairs:
            a.close()
            b.close()
        t.close()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------ EOF and pause_reading()


class RandomPauser(asyncio.Protocol):
    """Pauses reading now and then from inside data_received; the driver resumes it."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.h = hashlib.sha256()
        self.n = 0
        self.eof_at: int | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        assert self.eof_at is None, "data after eof_received()"
        self.h.update(data)
        self.n += len(data)
        if self.rnd.random() < 0.3:
            self.transport.pause_reading()

    def eof_received(self):
        self.eof_at = self.n
        return True

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


async def _pause_mix_scenario(family, path, seed: int) -> None:
    loop = asyncio.get_running_loop()
    rnd = random.Random(seed)
    protos: list[RandomPauser] = []

    def factory():
        protos.append(RandomPauser(random.Random(seed + 1)))
        return protos[-1]

    if family == socket.AF_UNIX:
        server = await loop.create_unix_server(factory, path)
        _, client = await loop.create_unix_connection(
            lambda: RandomPauser(random.Random(seed + 2)), path
        )
    else:
        server = await loop.create_server(factory, "127.0.0.1", 0)
        _, client = await loop.create_connection(
            lambda: RandomPauser(random.Random(seed + 2)), *server.sockets[0].getsockname()
        )
    while not protos or not hasattr(protos[0], "transport"):  # connection_made() is a call_soon
        await asyncio.sleep(0.001)
    srv = protos[0]
    sent = {id(srv): hashlib.sha256(), id(client): hashlib.sha256()}
    total = {id(srv): 0, id(client): 0}
    for _ in range(rnd.randrange(5, 30)):
        src, dst = (client, srv) if rnd.random() < 0.5 else (srv, client)
        chunk = rnd.randbytes(rnd.choice([1, 10, 1000, 16_384, 65_536, 200_000, 524_288]))
        src.transport.write(chunk if rnd.random() < 0.5 else bytearray(chunk))
        sent[id(dst)].update(chunk)
        total[id(dst)] += len(chunk)
        if rnd.random() < 0.4:
            await asyncio.sleep(0)
        for p in (srv, client):
            if not p.transport.is_reading() and rnd.random() < 0.5:
                p.transport.resume_reading()
    client.transport.write_eof()
    srv.transport.write_eof()
    deadline = loop.time() + 30
    while srv.eof_at is None or client.eof_at is None:
        assert loop.time() < deadline, (srv.n, total[id(srv)], client.n, total[id(client)])
        await asyncio.sleep(0.001)
        for p in (srv, client):
            p.transport.resume_reading()
    for p in (srv, client):
        assert p.eof_at == total[id(p)], f"EOF after {p.eof_at} of {total[id(p)]} bytes"
        assert p.h.digest() == sent[id(p)].digest()
    client.transport.close()
    srv.transport.close()
    await asyncio.wait_for(asyncio.gather(srv.lost, client.lost), 10)
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
async def test_eof_never_overtakes_data_read_around_pause_reading(family, tmp_path):
    for seed in range(25):
        await _pause_mix_scenario(family, str(tmp_path / f"s{seed}.sock"), seed)


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def test_eof_never_overtakes_data_single_shot(family, tmp_path):
    loop = uringloop.new_event_loop(recv_multishot=False)

    async def main():
        for seed in range(25):
            await _pause_mix_scenario(family, str(tmp_path / f"s{seed}.sock"), 1000 + seed)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


# ------------------------------------------------------------ what reading suggested


class PausingBuffered(asyncio.BufferedProtocol):
    """Pauses reading in every buffer_updated(); counts calls that come while paused."""

    def __init__(self) -> None:
        self.buf = bytearray(1000)
        self.data = bytearray()
        self.while_paused = 0
        self.paused = False
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        if self.paused:
            self.while_paused += 1
        self.data += self.buf[:nbytes]
        self.paused = True
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(0.002, self.resume)

    def resume(self):
        if not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self):
        self.eof.set_result(None)
        return True


@pytest.mark.asyncio
async def test_buffer_updated_never_comes_while_paused(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    transport, proto = await loop.connect_accepted_socket(PausingBuffered, a)
    payload = bytes(range(256)) * 200
    for i in range(0, len(payload), 5000):
        b.sendall(payload[i : i + 5000])
        await asyncio.sleep(0)
    b.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(proto.eof, 10)
    assert (bytes(proto.data) == payload, proto.while_paused) == (True, 0)
    transport.close()
    b.close()
    await asyncio.sleep(0)


class Interrupting(asyncio.Protocol):
    def data_received(self, data):
        raise KeyboardInterrupt


@pytest.mark.parametrize("loop_name", ["asyncio", "uringloop", "uringloop-single-shot"])
def test_keyboard_interrupt_in_a_callback_leaves_the_loop_at_once(loop_name):
    """Raised inside a batch of completions, it must not wait for the next blocking wait
    (here a timer 30 s away): it leaves run_until_complete() now, as on asyncio's loop."""
    if loop_name == "asyncio":
        loop = asyncio.new_event_loop()
    else:
        loop = uringloop.new_event_loop(recv_multishot=loop_name == "uringloop")
    a, b = socket.socketpair()
    transports = []

    async def main():
        transports.append((await loop.connect_accepted_socket(Interrupting, a))[0])
        loop.call_later(30, lambda: None)
        b.send(b"^C")
        await asyncio.sleep(60)

    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(main())
        assert time.monotonic() - start < 5
    finally:
        for transport in transports:
            transport.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        a.close()
        b.close()


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_the_gc_sees_streams_on_the_dirty_list(fd_leak_check):
    """Streams the ring holds until the end of the iteration (queued writes) are its
    references: the cycle collector must see them, or it could free a live stream. (The
    ready list of received data lives only inside one reap, when no collection runs
    but one a callback starts: Ring_traverse visits it the same way.)"""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    transport.write(b"queued until the end of this iteration")
    assert transport._stream in gc.get_referents(loop._ring)  # on the dirty list
    transport.close()
    b.close()
    await asyncio.sleep(0.01)


def test_a_closed_ring_never_sets_up_the_buffer_ring():
    from uringloop._dataplane import Stream

    loop = uringloop.new_event_loop(recv_multishot=True)
    ring = loop._ring
    loop.close()
    a, b = socket.socketpair()
    try:
        stream = Stream(ring, a.fileno(), None, asyncio.Protocol(), 65536, False)
        stream.start_reading()  # no ring to read on: nothing happens
        assert ring.stats()["recv_buffer_ring"] is False
        assert ring.stats()["sqes"] == 0
    finally:
        a.close()
        b.close()
