"""loop.forward(): stream to stream inside the kernel (uringloop only).

The proxy's two sockets are transports made with connect_accepted_socket(); the
peers are plain non-blocking sockets driven with sock_sendall()/sock_recv(). Every
data test runs over TCP loopback and AF_UNIX socketpairs, splicing and copying
(splice=False). What must hold: every byte reaches the other peer exactly once and
in order (also when the forward is cancelled, or a transport closed, while bytes sit
in the pipe), back-pressure stops reads from the source, and nothing is left behind
(requests in flight, pipes, the transports' forward state).

Not covered: the switch to copying when a pair of sockets refuses splice. No such
pair is at hand: every stream socket splices on current kernels (TCP, AF_UNIX,
MPTCP), and an AF_UNIX SOCK_SEQPACKET pair is not a stream transport at all
(connect_accepted_socket() raises ValueError, as on asyncio's loop).
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import random
import socket
import struct
import sys
import termios

import pytest
import pytest_asyncio
from conftest import same

import uringloop

URINGLOOP = ["uringloop"]
DATA = random.Random(20240611).randbytes(5 * 1024 * 1024)
KINDS = ["tcp", "unix"]
splice_modes = pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
kinds = pytest.mark.parametrize("kind", KINDS)


def socket_pair(kind: str, buffers: int = 0) -> tuple[socket.socket, socket.socket]:
    """(peer, proxy side): a connected pair of stream sockets, the peer non-blocking;
    `buffers` sets every socket buffer's size (no autotuning: bounded, known queues)."""
    if kind == "unix":
        peer, side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socks = [peer, side]
    else:
        with socket.socket() as listener:
            peer = socket.socket()
            socks = [peer, listener]
            if buffers:  # (before the handshake: the window scale follows)
                for s in socks:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            peer.connect(listener.getsockname())
            side, _ = listener.accept()
            socks = [peer, side]
    if buffers:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    peer.setblocking(False)
    return peer, side


class Side(asyncio.Protocol):
    """A proxy side's protocol: collects what it receives, keeps the connection open
    at EOF; with `relay` set, what it receives (and its EOF) goes on to that transport
    instead (what a proxy does once a forward is over)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.relay: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.relay is not None:
            self.relay.write(data)
        else:
            self.data += data

    def eof_received(self):
        if not self.eof.done():
            self.eof.set_result(None)
        if self.relay is not None and not self.relay.is_closing():
            self.relay.write_eof()
        return True

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


class Proxy:
    """Two connections: a_peer <-> a (transport) and b_peer <-> b (transport)."""

    @classmethod
    async def open(cls, kind: str, a_factory=Side, b_factory=Side, buffers: int = 0) -> Proxy:
        loop = asyncio.get_running_loop()
        self = cls()
        self.a_peer, a_side = socket_pair(kind, buffers)
        self.b_peer, b_side = socket_pair(kind, buffers)
        self.a, self.a_proto = await loop.connect_accepted_socket(a_factory, sock=a_side)
        self.b, self.b_proto = await loop.connect_accepted_socket(b_factory, sock=b_side)
        await asyncio.sleep(0)  # connection_made
        return self

    closed = False

    async def close(self) -> None:
        self.closed = True
        for t in (self.a, self.b):
            t.close()
        self.a_peer.close()
        self.b_peer.close()
        for proto in (self.a_proto, self.b_proto):
            if hasattr(proto, "lost"):
                await asyncio.wait_for(asyncio.shield(proto.lost), 5)
        await asyncio.sleep(0.01)  # sockets closed after their receive ends


@pytest_asyncio.fixture
async def open_proxy():
    """Proxy.open(), with everything closed after the test, also when it failed."""
    opened = []

    async def open_(*args, **kwargs) -> Proxy:
        p = await Proxy.open(*args, **kwargs)
        opened.append(p)
        return p

    yield open_
    stuck = []
    for p in opened:
        for t in (p.a, p.b):
            fw = t._forward_src
            if fw is not None and not fw.settled.done():  # (a failed test: go on)
                pump = fw.pump
                stuck.append(f"{t!r}: in_pipe={pump.in_pipe} polls={pump.polls} {fw.stop_reason!r}")
                fw.settled.set_result(None)
    await asyncio.sleep(0.01)
    for p in opened:
        if not p.closed:
            p.a.abort()
            p.b.abort()
            await p.close()
    assert not stuck, f"forwards that never settled: {stuck}"


async def within(aw, timeout: float):
    """await aw, failing after timeout seconds. Unlike wait_for() this does not wait
    for a cancellation: a forward that never settles would not end on one either
    (open_proxy's clean-up releases it, so that the run goes on)."""
    fut = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({fut}, timeout=timeout)
    if not done:
        raise AssertionError(f"not done after {timeout} s: {fut!r}")
    return fut.result()


async def send_and_shut(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def read_all(sock: socket.socket, into: bytearray | None = None) -> bytes:
    """Everything until EOF; `into` shows the progress meanwhile."""
    loop = asyncio.get_running_loop()
    got = bytearray() if into is None else into
    while chunk := await loop.sock_recv(sock, 1 << 20):
        got += chunk
    return bytes(got)


async def read_at_least(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        assert chunk, "EOF too early"
        got += chunk
    return bytes(got)


async def forwarding(transport) -> object:
    """The Forwarder reading from transport, once its pump runs (held bytes and
    queued writes are behind it)."""
    for _ in range(2000):
        fw = transport._forward_src
        if fw is not None and (fw.pump.polls or fw.settled.done()):
            return fw
        await asyncio.sleep(0.001)
    raise AssertionError("the forward did not start")


async def send_until_stalled(sock: socket.socket) -> int:
    """Sends DATA until nothing more is taken for 0.3 s: how many bytes were taken."""
    loop = asyncio.get_running_loop()
    accepted = 0
    stalled_since = None
    while True:
        try:
            n = sock.send(DATA[accepted : accepted + 65536])
        except BlockingIOError:
            n = 0
        accepted += n
        assert accepted < len(DATA), "everything was taken: no back-pressure"
        now = loop.time()
        if n:
            stalled_since = None
        elif stalled_since is None:
            stalled_since = now
        elif now - stalled_since > 0.3:
            return accepted
        await asyncio.sleep(0.002 if n == 0 else 0)


def unread(sock: socket.socket | int) -> int:
    """FIONREAD: bytes waiting to be read (a socket's receive queue, a pipe)."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def unsent(sock: socket.socket) -> int:
    """SIOCOUTQ of a TCP socket: bytes sent but not yet acknowledged by the peer."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def assert_forward_state_clean(loop, *transports) -> None:
    assert not loop._splice_pipes._forwarding
    for t in transports:
        assert t._forward_src is None and t._forward_dst is None, t
        assert t._empty_waiter is None, t


def stats_delta(loop, before: dict) -> dict:
    now = loop.zerocopy_stats()
    return {
        k: now[k] - before[k]
        for k in ("forward_calls", "forward_spliced_bytes", "forward_copied_bytes")
    }


# ------------------------------------------------------------ the bytes


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_forward_both_ways_is_byte_exact_with_half_close(
    kind, splice, fd_leak_check, open_proxy
):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind)
    a_data, b_data = DATA[:4_000_000], DATA[-3_000_123:]
    before = loop.zerocopy_stats()
    to_b = asyncio.ensure_future(loop.forward(p.a, p.b, splice=splice))
    to_a = asyncio.ensure_future(loop.forward(p.b, p.a, splice=splice))
    await forwarding(p.a)
    await forwarding(p.b)
    results = await within(
        asyncio.gather(
            to_b,
            to_a,
            send_and_shut(p.a_peer, a_data),
            send_and_shut(p.b_peer, b_data),
            read_all(p.b_peer),
            read_all(p.a_peer),
        ),
        20,
    )
    assert results[:2] == [len(a_data), len(b_data)]
    assert same(results[4], a_data)
    assert same(results[5], b_data)
    total = len(a_data) + len(b_data)
    delta = stats_delta(loop, before)
    assert delta["forward_calls"] == 2
    if splice:
        assert delta["forward_spliced_bytes"] == total
        assert delta["forward_copied_bytes"] == 0
    else:
        assert delta["forward_spliced_bytes"] == 0
        assert delta["forward_copied_bytes"] == total
    # each source's protocol hears its EOF once reading resumes, and got no data
    await within(asyncio.gather(p.a_proto.eof, p.b_proto.eof), 5)
    assert p.a_proto.data == p.b_proto.data == b""
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_forward_without_write_eof_leaves_the_destination_open(
    kind, splice, fd_leak_check, open_proxy
):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind)
    data = DATA[:1_000_000]
    sent, count, got = await within(
        asyncio.gather(
            send_and_shut(p.a_peer, data),
            loop.forward(p.a, p.b, write_eof=False, splice=splice),
            read_at_least(p.b_peer, len(data)),
        ),
        10,
    )
    assert count == len(data)
    assert same(got, data)
    # no EOF: nothing more to read, and the destination still writes
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(loop.sock_recv(p.b_peer, 1), 0.2)
    p.b.write(b"after")
    p.b.write_eof()
    assert await within(read_all(p.b_peer), 5) == b"after"
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_forward_to_itself_is_an_echo(kind, splice, fd_leak_check, open_proxy):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind)
    data = DATA[:2_000_000]
    before = loop.zerocopy_stats()
    count, _, got = await within(
        asyncio.gather(
            loop.forward(p.a, p.a, splice=splice),
            send_and_shut(p.a_peer, data),
            read_all(p.a_peer),
        ),
        10,
    )
    assert count == len(data)
    assert same(got, data)
    delta = stats_delta(loop, before)
    # every byte counted once; spliced ones only when splicing. (Bytes a receive had
    # taken before the forward paused the transport are written, not spliced: with
    # single-shot receives, as on 5.19, that can be the first 200 KB.)
    moved = delta["forward_spliced_bytes"] + delta["forward_copied_bytes"]
    assert moved == len(data)
    assert delta["forward_spliced_bytes"] > (len(data) // 2 if splice else -1)
    assert splice or delta["forward_spliced_bytes"] == 0
    assert_forward_state_clean(loop, p.a)
    await p.close()


# ------------------------------------------------------------ back-pressure


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_a_destination_that_stops_reading_stops_reads_from_the_source(
    kind, splice, fd_leak_check, open_proxy
):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind, buffers=128 * 1024)
    pipe_size = 64 * 1024
    task = asyncio.ensure_future(loop.forward(p.a, p.b, pipe_size=pipe_size, splice=splice))
    fw = await forwarding(p.a)
    accepted = await send_until_stalled(p.a_peer)
    a_side, b_side = p.a._sock, p.b._sock
    # reading stopped: the proxy's source socket keeps bytes unread
    waiting = unread(a_side)
    assert waiting > 0
    # what the proxy holds (everything accepted that is in no socket buffer) is what
    # its pipe (its queue, copying) counts, and no more than pipe_size
    in_flight = unread(a_side) + unread(p.b_peer)
    if kind == "tcp":
        in_flight += unsent(p.a_peer) + unsent(b_side)
    held = accepted - in_flight
    assert held == fw.in_pipe, (held, fw.in_pipe, accepted, in_flight)
    assert 0 < held <= pipe_size
    if splice:
        assert unread(fw.pipe[0]) == held  # (the kernel's count of the pipe)
    await asyncio.sleep(0.05)
    assert unread(a_side) == waiting  # (still nothing read meanwhile)
    # the destination reads again: everything arrives, exact
    p.a_peer.shutdown(socket.SHUT_WR)
    count, got = await within(asyncio.gather(task, read_all(p.b_peer)), 10)
    assert count == accepted
    assert same(got, DATA[:accepted])
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


# ------------------------------------------------------------ errors from the peers


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_a_source_reset_is_raised_after_its_bytes_reached_the_destination(
    kind, splice, fd_leak_check, open_proxy
):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind, buffers=128 * 1024)
    task = asyncio.ensure_future(loop.forward(p.a, p.b, pipe_size=64 * 1024, splice=splice))
    await forwarding(p.a)
    p.a.write(b"unread")  # (a close with unread bytes resets an AF_UNIX socket too)
    accepted = await send_until_stalled(p.a_peer)
    assert unread(p.a._sock) > 0  # the destination peer has not read: bytes wait
    # what the proxy received (on TCP, the peer's socket still holds what the closed
    # window kept back: the reset discards it)
    received = accepted - (unsent(p.a_peer) if kind == "tcp" else 0)
    data = DATA[:received]
    p.a_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.a_peer.close()
    await asyncio.sleep(0.02)
    assert not task.done()  # the pipe's bytes wait for the destination
    got = bytearray()
    reader = asyncio.ensure_future(read_all(p.b_peer, got))
    with pytest.raises(ConnectionResetError):
        await within(task, 10)
    # every byte the proxy had received went to the destination before the error:
    # read by its peer, or in the sockets between them
    on_the_way = unread(p.b_peer) + (unsent(p.b._sock) if kind == "tcp" else 0)
    assert len(got) + on_the_way == len(data)
    p.b.close()
    await within(reader, 5)
    assert same(got, data)
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


@splice_modes
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_a_source_reset_reaches_the_source_protocol(splice, fd_leak_check, open_proxy):
    """Without the forward the protocol would hear of the reset: it must with it too."""
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp")
    task = asyncio.ensure_future(loop.forward(p.a, p.b, splice=splice))
    await forwarding(p.a)
    await loop.sock_sendall(p.a_peer, b"x" * 1000)
    await read_at_least(p.b_peer, 1000)
    p.a_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.a_peer.close()
    with pytest.raises(ConnectionResetError):
        await within(task, 5)
    await asyncio.sleep(0.1)
    assert not p.a_proto.eof.done()
    assert isinstance(await within(p.a_proto.lost, 1), ConnectionResetError)


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_a_destination_reset_is_raised_at_once(kind, splice, fd_leak_check, open_proxy):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind, buffers=128 * 1024)
    task = asyncio.ensure_future(loop.forward(p.a, p.b, splice=splice))
    await forwarding(p.a)
    sender = asyncio.ensure_future(loop.sock_sendall(p.a_peer, DATA))
    await read_at_least(p.b_peer, 100_000)
    # the destination peer goes away with bytes unread: a reset
    p.b_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.b_peer.close()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        await within(task, 5)
    assert not sender.done()  # (the source still sends: the error came at once)
    sender.cancel()
    assert_forward_state_clean(loop, p.a, p.b)
    p.a.abort()
    await p.close()


# ------------------------------------------------------------ cancellation


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_a_forward_cancelled_at_any_moment_delivers_every_byte_once(kind, splice, open_proxy):
    """After the cancel the source's protocol relays what it receives to the
    destination: the destination peer must get exactly the source's bytes in order,
    whatever the pipe held at that moment."""
    loop = asyncio.get_running_loop()
    rng = random.Random(f"forward-cancel-{kind}-{splice}")
    fds = open_fds()
    pipe_held = 0
    for _ in range(20):
        # (small socket buffers: a destination peer that does not read yet fills them,
        # and the pipe holds bytes when the cancel comes)
        p = await open_proxy(kind, buffers=rng.choice([0, 64 * 1024, 64 * 1024]))
        p.a_proto.relay = p.b  # data_received -> b.write once the forward is over
        start = rng.randrange(len(DATA) // 2)
        data = DATA[start : start + rng.randrange(1, 1_500_000)]
        reader_first = rng.random() < 0.5
        task = asyncio.ensure_future(
            loop.forward(p.a, p.b, splice=splice, pipe_size=rng.choice([None, 64 * 1024]))
        )
        sender = asyncio.ensure_future(send_and_shut(p.a_peer, data))
        reader = asyncio.ensure_future(read_all(p.b_peer)) if reader_first else None
        if rng.random() < 0.4:
            for _ in range(rng.randrange(12)):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(rng.uniform(0, 0.008))
        fw = p.a._forward_src
        if fw is not None and fw.in_pipe:
            pipe_held += 1
        task.cancel()
        try:
            count = await within(task, 10)
        except asyncio.CancelledError:
            count = None
        if reader is None:
            reader = asyncio.ensure_future(read_all(p.b_peer))
        got = await within(reader, 10)
        await within(sender, 5)
        assert same(got, data)
        assert count in (None, len(data))
        assert_forward_state_clean(loop, p.a, p.b)
        await p.close()
    assert pipe_held >= 3  # (the test did cancel with bytes in the pipe)
    assert open_fds() <= fds


@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_a_cancelled_forward_waits_for_its_requests(fd_leak_check, open_proxy):
    """A second cancel while the first waits for the kernel: the forward still
    settles before it raises."""
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp")
    p.a_proto.relay = p.b
    task = asyncio.ensure_future(loop.forward(p.a, p.b))
    fw = await forwarding(p.a)
    sender = asyncio.ensure_future(send_and_shut(p.a_peer, DATA[:2_000_000]))
    await read_at_least(p.b_peer, 10_000)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task, 10)
    assert fw.settled.done() and fw.pump.polls == 0
    got = await within(read_all(p.b_peer), 10)
    await within(sender, 5)
    assert same(got, DATA[10_000:2_000_000])
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


# ------------------------------------------------------------ close and abort


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest.mark.parametrize("which", ["src", "dst"])
@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_close_or_abort_of_either_transport_ends_the_forward(
    kind, splice, which, how, open_proxy
):
    loop = asyncio.get_running_loop()
    fds = open_fds()
    p = await open_proxy(kind, buffers=128 * 1024)
    data = DATA[:3_000_000]
    task = asyncio.ensure_future(loop.forward(p.a, p.b, splice=splice))
    await forwarding(p.a)
    sender = asyncio.ensure_future(send_and_shut(p.a_peer, data))
    first = await read_at_least(p.b_peer, 100_000)  # then the destination peer stops
    await asyncio.sleep(0.02)  # the pipe and the buffers fill
    getattr(p.a if which == "src" else p.b, how)()
    with pytest.raises(ConnectionResetError):
        await within(task, 5)
    if which == "src":
        # the destination goes on: the pipe's bytes, then its own writes
        p.b.write(b"after")
        p.b.close()
        got = first + await within(read_all(p.b_peer), 5)
        assert got.endswith(b"after")
        assert data.startswith(got[:-5])
        await within(p.a_proto.lost, 5)
        assert p.a_proto.data == b""
        try:
            await within(sender, 5)
        except (ConnectionResetError, BrokenPipeError):
            pass
    else:
        # the source goes on: its protocol gets the rest of the stream, and it writes
        await within(p.b_proto.lost, 5)
        await within(sender, 5)
        await within(p.a_proto.eof, 5)
        rest = bytes(p.a_proto.data)
        assert rest and data.endswith(rest)
        got = first + await within(read_all(p.b_peer), 5)
        assert data.startswith(got)
        assert len(got) + len(rest) <= len(data)  # (the pipe's bytes went with dst)
        p.a.write(b"back")
        assert await within(read_at_least(p.a_peer, 4), 5) == b"back"
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()
    assert open_fds() <= fds


# ------------------------------------------------------------ bytes before the forward


class PausedAtStart(Side):
    def connection_made(self, transport):
        super().connection_made(transport)
        transport.pause_reading()


class PausesAfterFive(asyncio.BufferedProtocol):
    """Takes 5 bytes, then pauses reading: the rest of that receive is held."""

    def __init__(self) -> None:
        self.buffer = bytearray(5)
        self.data = bytearray()
        self.eofs = 0

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buffer

    def buffer_updated(self, nbytes):
        self.data += self.buffer[:nbytes]
        self.transport.pause_reading()

    def eof_received(self):
        self.eofs += 1
        return True


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_bytes_in_the_socket_before_the_forward_go_first(
    kind, splice, fd_leak_check, open_proxy
):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind, a_factory=PausedAtStart)
    await loop.sock_sendall(p.a_peer, b"hello")
    for _ in range(5):
        await asyncio.sleep(0)
    assert p.a_proto.data == b""
    rest = DATA[:500_000]
    count, _, got = await within(
        asyncio.gather(
            loop.forward(p.a, p.b, splice=splice),
            send_and_shut(p.a_peer, rest),
            read_all(p.b_peer),
        ),
        10,
    )
    assert count == 5 + len(rest)
    assert same(got, b"hello" + rest)
    assert not p.a.is_reading()  # (its own pause stays)
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_bytes_held_by_the_transport_go_first(kind, splice, fd_leak_check, open_proxy):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind, a_factory=PausesAfterFive)
    await loop.sock_sendall(p.a_peer, b"hello, held world")
    for _ in range(100):
        if p.a._stream.holding and not p.a._stream.recv_in_kernel:
            break
        await asyncio.sleep(0.001)
    assert p.a_proto.data == b"hello"
    assert p.a._stream.holding  # ", held world" was received, not delivered
    before = loop.zerocopy_stats()
    rest = DATA[:500_000]
    count, _, got = await within(
        asyncio.gather(
            loop.forward(p.a, p.b, splice=splice),
            send_and_shut(p.a_peer, rest),
            read_all(p.b_peer),
        ),
        10,
    )
    assert count == len(b", held world") + len(rest)
    assert same(got, b", held world" + rest)
    delta = stats_delta(loop, before)
    if splice:  # the held bytes were copied, the rest spliced
        assert delta["forward_copied_bytes"] == len(b", held world")
        assert delta["forward_spliced_bytes"] == len(rest)
    assert p.a_proto.data == b"hello" and p.a_proto.eofs == 0
    p.a.resume_reading()  # the EOF was the forward's: the protocol hears it too
    for _ in range(100):
        if p.a_proto.eofs:
            break
        await asyncio.sleep(0.001)
    assert p.a_proto.eofs == 1 and p.a_proto.data == b"hello"
    assert_forward_state_clean(loop, p.a, p.b)
    p.a.close()
    await p.close()


@splice_modes
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_held_bytes_and_a_held_eof(splice, fd_leak_check, open_proxy):
    """The source's EOF came in while its protocol paused: the held bytes are all
    there is to forward, and the EOF stays for the protocol."""
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp", a_factory=PausesAfterFive)
    await send_and_shut(p.a_peer, b"hello, and goodbye")
    for _ in range(100):
        if p.a._stream.holding and not p.a._stream.recv_in_kernel:
            break
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    count, got = await within(
        asyncio.gather(loop.forward(p.a, p.b, splice=splice), read_all(p.b_peer)), 5
    )
    assert count == len(b", and goodbye")
    assert got == b", and goodbye"
    assert p.a_proto.eofs == 0
    p.a.resume_reading()
    for _ in range(100):
        if p.a_proto.eofs:
            break
        await asyncio.sleep(0.001)
    assert p.a_proto.eofs == 1 and p.a_proto.data == b"hello"
    assert_forward_state_clean(loop, p.a, p.b)
    p.a.close()
    await p.close()


@splice_modes
@kinds
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_writes_queued_on_the_destination_go_first(kind, splice, fd_leak_check, open_proxy):
    loop = asyncio.get_running_loop()
    p = await open_proxy(kind)
    queued = DATA[-2_000_000:]
    # a small send buffer: a send that is copied at once (kernels without SEND_ZC, such
    # as 5.19) could otherwise take all 2 MB into a TCP socket's autotuned buffer
    p.b.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    p.b.write(queued)  # more than the socket buffers take: most of it stays queued
    assert p.b.get_write_buffer_size() > 0
    rest = DATA[:1_000_000]
    count, _, got = await within(
        asyncio.gather(
            loop.forward(p.a, p.b, splice=splice),
            send_and_shut(p.a_peer, rest),
            read_all(p.b_peer),
        ),
        10,
    )
    assert count == len(rest)
    assert same(got, queued + rest)
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


# ------------------------------------------------------------ the protocol's pause/resume


@splice_modes
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_pause_reading_during_a_forward_is_remembered(splice, fd_leak_check, open_proxy):
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp")
    task = asyncio.ensure_future(loop.forward(p.a, p.b, splice=splice))
    await forwarding(p.a)
    assert not p.a.is_reading()
    p.a.pause_reading()  # (as its protocol would)
    assert not p.a.is_reading()
    data = DATA[:300_000]
    count, _, got = await within(
        asyncio.gather(task, send_and_shut(p.a_peer, data), read_all(p.b_peer)), 10
    )
    assert count == len(data) and same(got, data)
    assert not p.a.is_reading()
    await asyncio.sleep(0.05)
    assert not p.a_proto.eof.done()  # still paused: the EOF waits
    p.a.resume_reading()
    assert p.a.is_reading()
    await within(p.a_proto.eof, 5)
    assert p.a_proto.data == b""
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


@splice_modes
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_resume_reading_during_a_forward_takes_effect_at_its_end(
    splice, fd_leak_check, open_proxy
):
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp")
    task = asyncio.ensure_future(loop.forward(p.a, p.b, splice=splice))
    await forwarding(p.a)
    p.a.pause_reading()
    p.a.resume_reading()
    assert not p.a.is_reading()  # (the forward reads, not the protocol)
    data = DATA[:300_000]
    await loop.sock_sendall(p.a_peer, data)
    assert same(await within(read_at_least(p.b_peer, len(data)), 5), data)
    p.a.pause_reading()  # paused again, then the forward ends
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task, 10)
    assert not p.a.is_reading()
    await loop.sock_sendall(p.a_peer, b"later")
    await asyncio.sleep(0.05)
    assert p.a_proto.data == b""
    assert unread(p.a._sock) == 5  # left in the socket
    p.a.resume_reading()
    assert p.a.is_reading()
    for _ in range(500):
        if p.a_proto.data:
            break
        await asyncio.sleep(0.001)
    assert p.a_proto.data == b"later"
    assert_forward_state_clean(loop, p.a, p.b)
    await p.close()


# ------------------------------------------------------------ refused


@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_bad_arguments_are_refused(tls_contexts, fd_leak_check, open_proxy):
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp")
    with pytest.raises(TypeError, match="stream transports"):
        await loop.forward(object(), p.b)
    with pytest.raises(TypeError, match="stream transports"):
        await loop.forward(p.a, "b")
    with pytest.raises(ValueError, match="positive"):
        await loop.forward(p.a, p.b, pipe_size=0)
    with pytest.raises(TypeError, match="pipe_size"):
        await loop.forward(p.a, p.b, pipe_size="x")
    with pytest.raises(TypeError, match="pipe_size"):
        await loop.forward(p.a, p.b, pipe_size=True)
    assert_forward_state_clean(loop, p.a, p.b)

    # TLS: its bytes must be decrypted in user space
    server_ctx, client_ctx = tls_contexts
    server_side = []

    def server_protocol():
        server_side.append(Side())
        return server_side[-1]

    server = await loop.create_server(server_protocol, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    tls, _ = await loop.create_connection(
        Side, "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
    )
    for _ in range(1000):  # (the server's side of the handshake may end later)
        if server_side and hasattr(server_side[0], "transport"):
            break
        await asyncio.sleep(0.001)
    with pytest.raises(TypeError, match="TLS"):
        await loop.forward(tls, p.b)
    with pytest.raises(TypeError, match="TLS"):
        await loop.forward(server_side[0].transport, p.b)
    with pytest.raises(TypeError, match="TLS"):
        await loop.forward(p.a, tls)
    tls.close()
    server_side[0].transport.close()
    await within(server_side[0].lost, 5)
    server.close()
    await server.wait_closed()

    # the destination owned by a forward: write() and a second forward are refused
    task = asyncio.ensure_future(loop.forward(p.a, p.b))
    await forwarding(p.a)
    with pytest.raises(RuntimeError):
        p.b.write(b"x")
    with pytest.raises(RuntimeError, match="already being forwarded"):
        await loop.forward(p.a, p.b)
    with pytest.raises(RuntimeError):  # (another source, the same destination)
        await loop.forward(p.b, p.b)
    p.a_peer.shutdown(socket.SHUT_WR)
    assert await within(task, 5) == 0  # (the refusals changed nothing)
    assert await within(read_all(p.b_peer), 5) == b""
    # after write_eof() (the forward's own): no forward to it any more
    with pytest.raises(RuntimeError, match="write_eof"):
        await loop.forward(p.a, p.b)
    assert_forward_state_clean(loop, p.a, p.b)
    p.b.close()
    with pytest.raises(RuntimeError, match="closing"):
        await loop.forward(p.b, p.a)
    await p.close()


def test_a_forward_runs_with_uringloop_run():
    """(The public entry point: no fixture loop.)"""

    async def main():
        p = await Proxy.open("unix")
        count, _, got = await asyncio.gather(
            asyncio.get_running_loop().forward(p.a, p.b),
            send_and_shut(p.a_peer, b"x" * 10000),
            read_all(p.b_peer),
        )
        await p.close()
        return count, got

    assert uringloop.run(main()) == (10000, b"x" * 10000)


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="splice's number")
def test_splice_refused_goes_on_by_copying():
    """splice(2) refused (EINVAL from a seccomp filter in a child process): the first move
    finds it, and both directions are copied instead, byte-exact, counted as copied."""
    import json
    import subprocess
    import sys

    child = os.path.join(os.path.dirname(__file__), "forward_refused_child.py")
    out = subprocess.run(
        [sys.executable, child], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["counts"] == [3_000_000, 1_000_000]
    assert result["exact"]
    assert result["stats"] == {
        "forward_calls": 2,
        "forward_spliced_bytes": 0,
        "forward_copied_bytes": 4_000_000,
    }


# ------------------------------------------------------------ defects found in review
#
# Each test failed before its fix.


@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_an_abort_of_the_source_ends_a_forward_waiting_for_queued_writes(open_proxy):
    """The forward first waits for everything the destination had queued; the source
    aborted meanwhile ends it at once (docstring: close() or abort() of either
    transport ends the forward), not once the destination's peer reads."""
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp", buffers=64 * 1024)
    p.b.write(DATA[:3_000_000])  # b_peer does not read: most of it stays queued
    task = asyncio.ensure_future(loop.forward(p.a, p.b))
    await asyncio.sleep(0.05)
    assert p.b.get_write_buffer_size() > 0 and not task.done()
    p.a.abort()
    done, _ = await asyncio.wait({task}, timeout=1)
    p.b.abort()  # (ends the wait in any case)
    with pytest.raises(ConnectionResetError):
        await within(task, 5)
    assert done, "the forward went on waiting for the destination after the source's abort"


@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_close_of_a_source_with_queued_writes_stops_the_forward_at_once(open_proxy):
    """After close() a transport reads nothing more (its protocol gets no data): the
    forward reading from it ends too, whatever its own writes still wait for."""
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp", buffers=64 * 1024)
    task = asyncio.ensure_future(loop.forward(p.a, p.b))
    await forwarding(p.a)
    p.a.write(DATA[:3_000_000])  # a_peer does not read: most of it stays queued
    assert p.a.get_write_buffer_size() > 0
    p.a.close()
    await loop.sock_sendall(p.a_peer, b"sent after close()")
    await asyncio.sleep(0.1)
    forwarded_after_close = unread(p.b_peer)
    done = task.done()
    p.a.abort()  # (ends the forward in any case)
    with pytest.raises(ConnectionResetError):
        await within(task, 5)
    assert forwarded_after_close == 0, "bytes read from the source after its close()"
    assert done


@splice_modes
@pytest.mark.asyncio(loop_factories=URINGLOOP)
async def test_write_eof_on_the_destination_during_a_forward_releases_the_source(
    splice, open_proxy
):
    loop = asyncio.get_running_loop()
    p = await open_proxy("tcp", buffers=128 * 1024)
    task = asyncio.ensure_future(loop.forward(p.a, p.b, pipe_size=64 * 1024, splice=splice))
    fw = await forwarding(p.a)
    await send_until_stalled(p.a_peer)
    assert fw.in_pipe > 0
    p.b.write_eof()  # (by its protocol, say): the pump's next move to it fails, EPIPE
    error = None
    try:
        await within(task, 5)
    except Exception as exc:
        error = exc
    released = p.a._forward_src is None
    if not released:
        p.a._forward_end()  # (what the forward missed: the source's socket can close)
    assert isinstance(error, OSError), repr(error)  # (the destination's error)
    assert released, "the source is still owned by a forward that ended"


def _loop_closed_under_a_forward(settle: bool):
    """A uringloop loop closed while a forward's task was pending with bytes in its pipe
    (settle: the forward had settled, its task not yet run again): (proxy, task,
    Forwarder), the loop closed."""
    loop = uringloop.new_event_loop()
    loop.set_exception_handler(lambda loop, context: None)  # ("Task was destroyed ...")

    async def start():
        p = await Proxy.open("unix", buffers=64 * 1024)
        task = asyncio.ensure_future(loop.forward(p.a, p.b, pipe_size=64 * 1024))
        fw = await forwarding(p.a)
        await send_until_stalled(p.a_peer)
        return p, task, fw

    p, task, fw = loop.run_until_complete(start())
    assert fw.in_pipe > 0 and fw.pump.splicing
    if settle:
        p.a.abort()  # the stop's cancel goes with the next iteration
        loop.run_until_complete(fw.settled)  # settled; the task's wake-up stays queued
    assert not task.done()
    loop.close()
    return p, task, fw


def _drop_after_loop_close(p) -> None:
    """The proxy's sockets closed, its transports (of a closed loop) collected."""
    p.a_peer.close()
    p.b_peer.close()
    transports, p.a, p.b, p.a_proto, p.b_proto = [p.a, p.b], None, None, None, None
    while transports:
        t = transports.pop()
        for sock in (t._sock, t._sock_after_sendfile, t._sock_after_recv):
            if sock is not None:
                sock.close()
        t._closing = True  # (no "unclosed transport" warning: its loop is gone)
    del t
    gc.collect()


def test_a_forward_finalized_after_loop_close_reads_no_closed_fd():
    """The loop stopped and closed between the forward's settling and its task's next
    step (the pipe still held bytes). The task, destroyed pending, runs its clean-up
    (GeneratorExit): it must not read the pipe's old fd number, which may name another
    file by then (here a non-blocking pipe; a blocking one hangs the thread)."""
    unraisable = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        p, task, fw = _loop_closed_under_a_forward(settle=True)
        pipe_r = fw.pipe[0]
        r, w = os.pipe2(os.O_NONBLOCK)
        os.dup2(r, pipe_r)  # the number names another pipe now
        os.close(r)
        os.write(w, b"another file's bytes")
        del task, fw
        gc.collect()
        left = unread(pipe_r)
        os.close(pipe_r)
        os.close(w)
        _drop_after_loop_close(p)
    finally:
        sys.unraisablehook = old_hook
        unraisable.clear()
    assert left == len(b"another file's bytes"), "read from a closed fd number"


def test_a_forward_pending_at_loop_close_is_destroyed_quietly():
    """A pending task destroyed after loop.close() is reported once ("Task was
    destroyed but it is pending!", as on asyncio's loop); the forward's own clean-up
    adds no errors (here: "coroutine ignored GeneratorExit" and take_leftover()'s
    RuntimeError, both unraisable)."""
    unraisable = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        p, task, fw = _loop_closed_under_a_forward(settle=False)
        assert fw.pump.polls == 0  # (the ring's close retired them)
        del task, fw
        _drop_after_loop_close(p)
        errors = [repr(u.exc_value) for u in unraisable]
    finally:
        sys.unraisablehook = old_hook
        unraisable.clear()
    assert errors == []
