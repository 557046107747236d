"""UDP and Unix datagram endpoints, and the datagram socket methods, on all three loops.

asyncio's _SelectorDatagramTransport is the reference: what its protocols see, in
which order, on which iteration and in which contextvars context, what sendto()
raises and what it reports to error_received() instead, how its write buffer pauses
the protocol, and the datagram sock_* methods under cancellation. Where uvloop
differs from asyncio the uvloop parametrization is skipped with the difference as
the reason; asyncio stays the reference for uringloop's native transport.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextvars
import errno
import inspect
import logging
import os
import random
import socket
import struct
import sys
import tempfile
from asyncio import selector_events

import pytest
from conftest import _factories, _uringloops, has_ipv6_loopback

import uringloop


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


@pytest.mark.asyncio(loop_factories=["uvloop", "uringloop"])
async def test_socketpair_endpoint_sends_to_its_peer_without_an_address():
    # Not on asyncio's loop: an unnamed Unix socket's peer name is '', which its
    # transport takes for "not connected", so sendto(data) fails fatally
    # (sock.sendto(data, None)). uvloop's own test_socketpair sends it; so do we.
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.settimeout(5)
    with ours, theirs:
        transport, proto = await loop.create_datagram_endpoint(Datagrams, sock=ours)
        assert transport.get_extra_info("peername") == ""
        theirs.send(b"hello, socketpair")
        data, addr = await asyncio.wait_for(proto.queue.get(), 5)
        assert (data, addr) == (b"hello, socketpair", None)
        transport.sendto(b"one back")
        transport.sendto(b"and another", None)
        assert await loop.run_in_executor(None, theirs.recv, 100) == b"one back"
        assert await loop.run_in_executor(None, theirs.recv, 100) == b"and another"
        assert proto.errors.empty()
        transport.close()
        assert await proto.closed is None


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


# --- helpers for the reference-semantics tests below ---------------------------------

MAX_DATAGRAM = 65000
PATTERN = bytes(range(251)) * 300  # position-dependent content, longer than any datagram
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; the constant is not exported


def payload(index: int, size: int) -> bytes:
    """Datagram number ``index`` of ``size`` bytes: its number first, then a pattern."""
    start = index % 251
    return (struct.pack("!I", index) + PATTERN[start : start + size])[:size]


def is_uvloop() -> bool:
    return type(asyncio.get_running_loop()).__module__.startswith("uvloop")


def skip_on_uvloop(difference: str) -> None:
    if is_uvloop():
        pytest.skip(f"uvloop differs from asyncio: {difference}")


def buffer_size_drifts() -> bool:
    """asyncio on 3.13.0 counts len+8 per buffered datagram and takes back len when it
    goes out: get_write_buffer_size() keeps 8 bytes for every datagram ever buffered."""
    loop = asyncio.get_running_loop()
    return sys.version_info[:3] == (3, 13, 0) and type(loop) is asyncio.SelectorEventLoop


async def until(predicate, what: str, timeout: float = 5.0) -> None:
    """Wait, polling every millisecond, until ``predicate()``; fail after ``timeout``."""

    async def poll():
        while not predicate():
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def assert_same_datagrams(got: list, want: list) -> None:
    """List equality with a short message (pytest would diff megabytes)."""
    got = [bytes(d) for d in got]
    if got == want:
        return
    first = next(
        (i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
        min(len(got), len(want)),
    )
    detail = ""
    if first < min(len(got), len(want)):
        detail = f": {len(got[first])} bytes, {len(want[first])} expected"
    raise AssertionError(
        f"{len(got)} datagrams, {len(want)} expected; first difference at #{first}{detail}"
    )


class Log(asyncio.DatagramProtocol):
    """Every callback a datagram protocol gets, in order, as (name, argument) pairs."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append(("made", transport))

    def datagram_received(self, data, addr):
        self.events.append(("datagram", bytes(data), addr))

    def error_received(self, exc):
        self.events.append(("error", exc))

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        if not self.closed.done():
            self.closed.set_result(exc)

    def pause_writing(self):
        self.events.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self):
        self.events.append(("resume", self.transport.get_write_buffer_size()))

    def named(self, name: str) -> list[tuple]:
        return [e for e in self.events if e[0] == name]

    @property
    def datagrams(self) -> list[bytes]:
        return [e[1] for e in self.events if e[0] == "datagram"]

    @property
    def errors(self) -> list[BaseException]:
        return [e[1] for e in self.events if e[0] == "error"]


@pytest.fixture
def short_dir():
    """A directory with a short path: Unix socket paths must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="dg", dir="/tmp") as d:
        yield d


def unix_pair(directory: str) -> tuple[socket.socket, socket.socket]:
    """(sender, receiver): named, non-blocking Unix datagram sockets, the sender connected."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(os.path.join(directory, "r"))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.bind(os.path.join(directory, "s"))
    sender.connect(os.path.join(directory, "r"))
    sender.setblocking(False)
    return sender, receiver


def block_receiver(receiver: socket.socket) -> list[bytes]:
    """Fill a Unix datagram receiver's queue from a third socket; what it sent.

    The kernel queues at most net.unix.max_dgram_qlen datagrams for a receiver that
    does not read; after that every sender's non-blocking send fails with EAGAIN until
    the receiver reads: the way to make a datagram transport hold datagrams back on a
    real socket, for as long as the test wants.
    """
    sent = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as blocker:
        blocker.connect(receiver.getsockname())
        blocker.setblocking(False)
        while True:
            data = b"blocker %d" % len(sent)
            try:
                blocker.send(data)
            except BlockingIOError:
                return sent
            sent.append(data)
            assert len(sent) < 100_000


def read_all_now(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(MAX_DATAGRAM + 1000))
        except BlockingIOError:
            return got


async def read_n(sock: socket.socket, n: int, timeout: float = 5.0) -> list[bytes]:
    """Read ``n`` datagrams from a plain non-blocking socket, polling."""
    got: list[bytes] = []

    def more():
        got.extend(read_all_now(sock))
        return len(got) >= n

    await until(more, f"{n} datagrams on a plain socket", timeout)
    return got


def dead_udp_address() -> tuple[str, int]:
    """A loopback UDP port nobody listens on (it was bound a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def udp_socket(rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 2 * rcvbuf:
            try:  # beyond net.core.rmem_max: root (CAP_NET_ADMIN) only
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                pass
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


# --- order and byte-exactness ----------------------------------------------------------


def burst(n: int = 200) -> list[bytes]:
    """``n`` datagrams of 1 B .. 65000 B, log-uniform (mostly small, some near the top)."""
    rng = random.Random(20240611)
    sizes = [1, MAX_DATAGRAM, 2, MAX_DATAGRAM - 1]
    sizes += [max(1, int(MAX_DATAGRAM ** rng.random())) for _ in range(n - len(sizes))]
    return [payload(i, size) for i, size in enumerate(sizes)]


async def burst_roundtrip(family: str, api: str, directory: str) -> None:
    """The burst from one endpoint to another on the running loop, all in one callback.

    The receiver cannot drain in between: over UDP its receive buffer must hold the
    whole burst (asyncio sends at once and the kernel drops what does not fit); Unix
    datagram sockets make the sender wait instead.
    """
    loop = asyncio.get_running_loop()
    datagrams = burst()
    if family == "inet":
        need = sum(len(d) for d in datagrams) * 2  # truesize on loopback stays below 1.5x
        rsock = udp_socket(rcvbuf=need)
        if rsock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < need:
            rsock.close()
            pytest.skip(f"a UDP receive buffer of {need} bytes needs net.core.rmem_max or root")
        ssock = udp_socket()
        dest = rsock.getsockname()
    else:
        ssock, rsock = unix_pair(directory)
        dest = None  # connected
    receiver, rproto = await loop.create_datagram_endpoint(Log, sock=rsock)
    sender, sproto = await loop.create_datagram_endpoint(Log, sock=ssock)
    pairs = [(d, dest) for d in datagrams]
    if api == "sendto":
        for data, addr in pairs:
            sender.sendto(data, addr)
    else:
        uringloop.sendto_many(sender, pairs)
    await until(lambda: len(rproto.datagrams) >= len(datagrams), "the burst")
    await asyncio.sleep(0.02)  # nothing more comes
    assert_same_datagrams(rproto.datagrams, datagrams)
    assert sproto.errors == [] and rproto.errors == []
    assert {e[2] for e in rproto.named("datagram")} == {ssock.getsockname()}
    if not buffer_size_drifts():
        await until(lambda: sender.get_write_buffer_size() == 0, "the sender's buffer to drain")
    sender.close()
    receiver.close()
    await asyncio.wait_for(asyncio.gather(sproto.closed, rproto.closed), 5)


@pytest.mark.asyncio
@pytest.mark.parametrize("api", ["sendto", "sendto_many"])
@pytest.mark.parametrize("family", ["inet", "unix"])
async def test_burst_arrives_complete_and_in_order(family, api, short_dir, fd_leak_check):
    await burst_roundtrip(family, api, short_dir)


@pytest.mark.parametrize(
    "options",
    [{"zerocopy": "always", "zc_threshold": 1024}, {"recv_multishot": False}],
    ids=["sendmsg_zc", "single_shot_recv"],
)
@pytest.mark.parametrize("api", ["sendto", "sendto_many"])
@pytest.mark.parametrize("family", ["inet", "unix"])
def test_burst_arrives_complete_and_in_order_on_uringloop_variants(
    family, api, options, short_dir, fd_leak_check
):
    # uringloop only: its zero-copy sends from 1 KiB on (the default threshold, 64 KiB,
    # is above any UDP datagram), and its receive path without multishot
    loop = uringloop.new_event_loop(**options)
    _uringloops.append(loop)  # conftest's ring_leak_check looks at it after the test
    try:
        loop.run_until_complete(burst_roundtrip(family, api, short_dir))
    finally:
        loop.close()


@pytest.mark.asyncio
async def test_sendto_and_sendto_many_interleaved_keep_call_order():
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    dest = receiver.get_extra_info("sockname")
    sender, _ = await loop.create_datagram_endpoint(Log, remote_addr=dest)
    want = [payload(i, 10 + 997 * i) for i in range(8)]
    sender.sendto(want[0])
    uringloop.sendto_many(sender, [(want[1], None), (want[2], dest)])
    sender.sendto(want[3], dest)
    uringloop.sendto_many(sender, [])
    uringloop.sendto_many(sender, iter([(want[4], None)]))  # any iterable of pairs
    sender.sendto(want[5])
    uringloop.sendto_many(sender, ((d, None) for d in want[6:]))
    await until(lambda: len(rproto.datagrams) >= len(want), "8 datagrams")
    assert_same_datagrams(rproto.datagrams, want)
    sender.close()
    receiver.close()


@pytest.mark.asyncio
async def test_sendto_many_stops_at_a_bad_item_like_a_loop_of_sendto():
    # the fallback is sendto() per pair, so the pairs before the bad one are sent,
    # the bad one raises sendto()'s TypeError, the ones after it are not sent
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    sender, _ = await loop.create_datagram_endpoint(
        Log, remote_addr=receiver.get_extra_info("sockname")
    )
    with pytest.raises(TypeError):
        uringloop.sendto_many(
            sender, [(b"one", None), (b"two", None), ("three", None), (b"four", None)]
        )
    sender.sendto(b"five")
    await until(lambda: b"five" in rproto.datagrams, "the datagram after the failed burst")
    assert rproto.datagrams == [b"one", b"two", b"five"]
    assert not sender.is_closing()
    sender.close()
    receiver.close()


@pytest.mark.asyncio
async def test_bytearray_and_memoryview_mutated_after_sendto_arrive_with_old_content():
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    sender, _ = await loop.create_datagram_endpoint(
        Log, remote_addr=receiver.get_extra_info("sockname")
    )
    small = bytearray(b"old small")
    big = bytearray(b"o" * 60000)
    view = memoryview(bytearray(b"old view!"))
    for data in (small, big, view):
        sender.sendto(data)
    small[:] = b"NEW SMALL"
    big[:] = b"N" * 60000
    view[:] = b"NEW VIEW!"
    await until(lambda: len(rproto.datagrams) >= 3, "3 datagrams")
    assert_same_datagrams(rproto.datagrams, [b"old small", b"o" * 60000, b"old view!"])
    sender.close()
    receiver.close()


@pytest.mark.asyncio
async def test_sendto_sends_the_raw_bytes_of_any_buffer():
    # a memoryview of ints is len() 3 but 12 bytes: the datagram is the 12 bytes
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    sender, _ = await loop.create_datagram_endpoint(
        Log, remote_addr=receiver.get_extra_info("sockname")
    )
    ints = array.array("i", [1, 2, 3])
    sender.sendto(memoryview(ints))
    sender.sendto(memoryview(b"abcdef")[2:5])
    await until(lambda: len(rproto.datagrams) >= 2, "2 datagrams")
    assert rproto.datagrams == [ints.tobytes(), b"cde"]
    sender.close()
    receiver.close()


# --- callback order and timing ---------------------------------------------------------


@pytest.mark.asyncio
async def test_connection_made_comes_before_any_datagram_received():
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        for i in range(3):  # already waiting in the socket when the endpoint is made
            peer.sendto(b"early %d" % i, sock.getsockname())
        transport, proto = await loop.create_datagram_endpoint(Log, sock=sock)
        assert proto.events[0] == ("made", transport)  # before create_datagram_endpoint returns
        await until(lambda: len(proto.datagrams) >= 3, "3 datagrams")
    assert [e[0] for e in proto.events] == ["made", "datagram", "datagram", "datagram"]
    assert proto.datagrams == [b"early 0", b"early 1", b"early 2"]
    transport.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "abort"])
async def test_connection_lost_comes_on_the_next_iteration_not_inside_close(how, fd_leak_check):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    getattr(transport, how)()
    assert proto.named("lost") == []
    await asyncio.sleep(0)  # asyncio: loop.call_soon(_call_connection_lost, None)
    assert proto.named("lost") == [("lost", None)]


@pytest.mark.asyncio
async def test_close_twice_then_abort_calls_connection_lost_once():
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    transport.close()
    transport.close()
    transport.abort()
    await proto.closed
    transport.close()
    transport.abort()
    await asyncio.sleep(0.01)
    assert proto.named("lost") == [("lost", None)]


@pytest.mark.asyncio
async def test_is_closing_is_true_from_close_on():
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    assert not transport.is_closing()
    transport.close()
    assert transport.is_closing()
    await proto.closed
    assert transport.is_closing()
    aborted, aproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    aborted.abort()
    assert aborted.is_closing()
    await aproto.closed


async def send_across_iterations(transport, datagrams: list[bytes]) -> None:
    """sendto() each datagram on its own loop iteration."""
    for data in datagrams:
        transport.sendto(data)
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_close_with_datagrams_queued_sends_them_then_calls_connection_lost(short_dir):
    loop = asyncio.get_running_loop()
    ssock, rsock = unix_pair(short_dir)
    with rsock:
        blocked = block_receiver(rsock)
        transport, proto = await loop.create_datagram_endpoint(Log, sock=ssock)
        sent = [payload(i, 1000) for i in range(5)]
        await send_across_iterations(transport, sent)
        transport.close()
        assert transport.is_closing()
        await asyncio.sleep(0.02)
        assert proto.named("lost") == []  # the socket still refuses them
        got = await read_n(rsock, len(blocked) + len(sent))
        await asyncio.wait_for(proto.closed, 5)
        assert_same_datagrams(got, blocked + sent)
        assert proto.named("lost") == [("lost", None)] and proto.errors == []
        await asyncio.sleep(0.01)
        assert read_all_now(rsock) == []


@pytest.mark.asyncio
async def test_abort_with_datagrams_queued_drops_them(short_dir):
    loop = asyncio.get_running_loop()
    ssock, rsock = unix_pair(short_dir)
    with rsock:
        blocked = block_receiver(rsock)
        transport, proto = await loop.create_datagram_endpoint(Log, sock=ssock)
        await send_across_iterations(transport, [payload(i, 1000) for i in range(5)])
        await asyncio.sleep(0.01)
        transport.abort()
        assert proto.named("lost") == []
        await asyncio.sleep(0)
        assert proto.named("lost") == [("lost", None)]
        got = await read_n(rsock, len(blocked))
        await asyncio.sleep(0.05)
        got += read_all_now(rsock)
        assert_same_datagrams(got, blocked)  # none of the aborted transport's
        assert proto.errors == []


@pytest.mark.asyncio
async def test_sendto_after_close_on_connected_transport_is_dropped_and_warns_from_the_fifth(
    caplog,
):
    # asyncio counts sends after close in _conn_lost (1 at close) and logs a warning
    # once the count reaches constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES (5): on the
    # 5th sendto after close and on every one after it (3.11 and 3.13 alike)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        transport, proto = await loop.create_datagram_endpoint(Log, remote_addr=peer.getsockname())
        transport.close()
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            transport.sendto(b"after close 1")  # before connection_lost
            transport.sendto(b"after close 2")
            await proto.closed
            transport.sendto(b"after close 3")
            transport.sendto(b"after close 4")
            assert not caplog.records
            transport.sendto(b"after close 5")
            messages = [r.getMessage() for r in caplog.records]
            assert messages == ["socket.send() raised exception."]
            transport.sendto(b"after close 6")
            assert len(caplog.records) == 2
        await asyncio.sleep(0.02)
        assert read_all_now(peer) == []
        assert proto.errors == []


@pytest.mark.asyncio
async def test_sendto_after_close_still_checks_type_and_address():
    skip_on_uvloop("after close its sendto() returns before looking at data or address")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        transport, proto = await loop.create_datagram_endpoint(Log, remote_addr=peer.getsockname())
        transport.close()
        await proto.closed
        with pytest.raises(TypeError):
            transport.sendto("text")
        with pytest.raises(ValueError):
            transport.sendto(b"x", ("127.0.0.1", peer.getsockname()[1] ^ 1))


@pytest.mark.asyncio
async def test_buffering_beyond_high_water_pauses_and_draining_resumes_the_protocol(short_dir):
    # asyncio: the buffer holds what the socket refused (EAGAIN), across iterations;
    # the sendto() that takes its size above the high-water mark calls pause_writing()
    # before it returns; resume_writing() comes once sending brought it down to the
    # low mark. One datagram per iteration, as a protocol that paces itself would.
    loop = asyncio.get_running_loop()
    ssock, rsock = unix_pair(short_dir)
    with rsock:
        blocked = block_receiver(rsock)
        transport, proto = await loop.create_datagram_endpoint(Log, sock=ssock)
        transport.set_write_buffer_limits(high=3000, low=1000)
        sent: list[bytes] = []
        while True:
            assert len(sent) < 100, "pause_writing never came"
            before = transport.get_write_buffer_size()
            sent.append(payload(len(sent), 1000))
            transport.sendto(sent[-1])
            if proto.named("pause"):
                break
            await asyncio.sleep(0)
            assert not proto.named("pause"), "pause_writing came outside sendto()"
        assert before <= 3000 < proto.named("pause")[0][1] == transport.get_write_buffer_size()
        await asyncio.sleep(0.01)
        assert proto.named("resume") == [] and transport.get_write_buffer_size() > 3000
        got = await read_n(rsock, len(blocked) + len(sent))
        assert_same_datagrams(got, blocked + sent)
        await until(lambda: proto.named("resume"), "resume_writing")
        assert [e[0] for e in proto.events if e[0] in ("pause", "resume")] == ["pause", "resume"]
        assert proto.named("resume")[0][1] <= 1000
        if not buffer_size_drifts():
            assert transport.get_write_buffer_size() == 0
        transport.close()
        await proto.closed


@pytest.mark.asyncio
async def test_default_write_buffer_limits_are_16k_and_64k():
    skip_on_uvloop("its UDP transport's default low-water mark is 16 bytes, not 16 KiB")
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    assert transport.get_write_buffer_limits() == (16384, 65536)
    assert transport.get_write_buffer_size() == 0
    transport.close()


@pytest.mark.asyncio
async def test_set_write_buffer_limits_derives_the_missing_mark_and_validates():
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    transport.set_write_buffer_limits(high=100)
    assert transport.get_write_buffer_limits() == (25, 100)
    transport.set_write_buffer_limits(low=10)
    assert transport.get_write_buffer_limits() == (10, 40)
    transport.set_write_buffer_limits(high=0)
    assert transport.get_write_buffer_limits() == (0, 0)
    with pytest.raises(ValueError, match=r"high \(1\) must be >= low \(2\) must be >= 0"):
        transport.set_write_buffer_limits(high=1, low=2)
    assert transport.get_write_buffer_limits() == (0, 0)
    transport.close()


# --- errors ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["text", 7, None, [1, 2], {b"x": 1}], ids=repr)
async def test_sendto_non_bytes_raises_type_error_and_sends_nothing(bad):
    if bad is None:
        skip_on_uvloop("its sendto(None) neither raises nor sends")
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    dest = receiver.get_extra_info("sockname")
    sender, sproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    with pytest.raises(TypeError):
        sender.sendto(bad, dest)
    sender.sendto(b"after", dest)
    await until(lambda: rproto.datagrams, "the next datagram")
    assert rproto.datagrams == [b"after"] and sproto.errors == []
    assert not sender.is_closing()
    sender.close()
    receiver.close()


@pytest.mark.asyncio
async def test_sendto_non_bytes_type_error_message_matches_asyncio():
    skip_on_uvloop("its message is \"a bytes-like object is required, not 'str'\"")
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    with pytest.raises(TypeError) as info:
        transport.sendto("text", ("127.0.0.1", 9))
    assert str(info.value) == "data argument must be a bytes-like object, not 'str'"
    with pytest.raises(TypeError) as info:
        transport.sendto(7, ("127.0.0.1", 9))
    assert str(info.value) == "data argument must be a bytes-like object, not 'int'"
    transport.close()


@pytest.mark.asyncio
async def test_sendto_other_address_on_connected_transport_raises_value_error():
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    dest = receiver.get_extra_info("sockname")
    sender, _ = await loop.create_datagram_endpoint(Log, remote_addr=dest)
    other = (dest[0], dest[1] ^ 1)
    with pytest.raises(ValueError) as info:
        sender.sendto(b"elsewhere", other)
    assert str(info.value) == f"Invalid address: must be None or {dest}"
    sender.sendto(b"to None")
    sender.sendto(b"to the same address", dest)
    await until(lambda: len(rproto.datagrams) >= 2, "2 datagrams")
    assert rproto.datagrams == [b"to None", b"to the same address"]
    sender.close()
    receiver.close()


@pytest.mark.asyncio
async def test_sendto_ipv6_address_on_ipv4_transport_goes_to_error_received():
    skip_on_uvloop("it raises ValueError('... socket family mismatch ...') from sendto()")
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    transport.sendto(b"x", ("::1", 9))  # does not raise
    await until(lambda: proto.errors, "error_received")
    [exc] = proto.errors
    assert isinstance(exc, socket.gaierror)
    assert not transport.is_closing()
    transport.sendto(b"still works", transport.get_extra_info("sockname"))
    await until(lambda: proto.datagrams, "a datagram to itself")
    assert proto.datagrams == [b"still works"]
    transport.close()


@pytest.mark.asyncio
async def test_sendto_path_address_on_ipv4_transport_is_a_fatal_error():
    # socket.sendto raises TypeError (not OSError), which asyncio's sendto() treats as
    # fatal: the exception handler, then connection_lost(that TypeError)
    skip_on_uvloop("it raises TypeError('AF_INET address must be tuple') from sendto()")
    loop = asyncio.get_running_loop()
    contexts = []
    loop.set_exception_handler(lambda loop, context: contexts.append(context))
    transport, proto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    transport.sendto(b"x", "/tmp/not-an-inet-address")  # does not raise
    assert transport.is_closing()
    exc = await asyncio.wait_for(proto.closed, 5)
    assert isinstance(exc, TypeError)
    assert proto.errors == []
    [context] = contexts
    assert context["message"] == "Fatal write error on datagram transport"
    assert context["exception"] is exc
    assert context["transport"] is transport and context["protocol"] is proto


@pytest.mark.asyncio
async def test_oversized_datagram_goes_to_error_received_and_endpoint_keeps_working():
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    me = transport.get_extra_info("sockname")
    transport.sendto(b"x" * 70000, me)  # above IPv4's 65507: does not raise
    await until(lambda: proto.errors, "error_received")
    [exc] = proto.errors
    assert type(exc) is OSError and exc.errno == errno.EMSGSIZE
    transport.sendto(b"y" * 65000, me)
    await until(lambda: proto.datagrams, "a datagram to itself")
    assert proto.datagrams == [b"y" * 65000] and len(proto.errors) == 1
    assert not transport.is_closing()
    transport.close()


@pytest.mark.asyncio
async def test_oversized_datagram_error_is_reported_before_sendto_returns():
    # asyncio (and uvloop) try the send inside sendto() when nothing is buffered,
    # so error_received(EMSGSIZE) has run by the time sendto() returns
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    try:
        transport.sendto(b"x" * 70000, transport.get_extra_info("sockname"))
        assert [e.errno for e in proto.errors] == [errno.EMSGSIZE]
    finally:
        transport.close()


@pytest.mark.asyncio
async def test_connected_udp_refused_then_keeps_working_both_ways():
    loop = asyncio.get_running_loop()
    dead = dead_udp_address()
    transport, proto = await loop.create_datagram_endpoint(Log, remote_addr=dead)
    transport.sendto(b"anyone?")
    await until(lambda: proto.errors, "error_received")
    assert isinstance(proto.errors[0], ConnectionRefusedError)
    assert not transport.is_closing()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(dead)  # now somebody listens there
        peer.setblocking(False)
        transport.sendto(b"again")
        assert await read_n(peer, 1) == [b"again"]
        peer.sendto(b"back", transport.get_extra_info("sockname"))
        await until(lambda: proto.datagrams, "the peer's datagram")
    assert proto.datagrams == [b"back"]
    assert proto.named("datagram")[0][2] == dead
    transport.close()
    assert await asyncio.wait_for(proto.closed, 5) is None


class Raising(Log):
    """Raises from datagram_received / error_received while ``fail_*`` is set."""

    fail_datagram = False
    fail_error = False

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        if self.fail_datagram:
            raise RuntimeError(f"datagram_received failed on {bytes(data)!r}")

    def error_received(self, exc):
        super().error_received(exc)
        if self.fail_error:
            raise RuntimeError("error_received failed")


@pytest.mark.asyncio
async def test_datagram_received_raising_goes_to_exception_handler_and_reading_goes_on():
    # asyncio: the exception leaves _read_ready, the Handle gives it to the loop's
    # exception handler; the transport is not closed and reads the next datagram
    loop = asyncio.get_running_loop()
    contexts = []
    loop.set_exception_handler(lambda loop, context: contexts.append(context))
    transport, proto = await loop.create_datagram_endpoint(Raising, local_addr=("127.0.0.1", 0))
    me = transport.get_extra_info("sockname")
    proto.fail_datagram = True
    transport.sendto(b"first", me)
    await until(lambda: contexts, "the exception handler")
    proto.fail_datagram = False
    transport.sendto(b"second", me)
    await until(lambda: len(proto.datagrams) >= 2, "the second datagram")
    assert proto.datagrams == [b"first", b"second"]
    [context] = contexts
    assert isinstance(context["exception"], RuntimeError)
    assert str(context["exception"]) == "datagram_received failed on b'first'"
    assert not transport.is_closing() and proto.named("lost") == []
    transport.close()
    assert await asyncio.wait_for(proto.closed, 5) is None


@pytest.mark.asyncio
async def test_error_received_raising_on_a_receive_error_goes_to_exception_handler():
    skip_on_uvloop("an exception from error_received is unraisable ('Exception ignored')")
    loop = asyncio.get_running_loop()
    contexts = []
    loop.set_exception_handler(lambda loop, context: contexts.append(context))
    dead = dead_udp_address()
    transport, proto = await loop.create_datagram_endpoint(Raising, remote_addr=dead)
    proto.fail_error = True
    transport.sendto(b"anyone?")  # ECONNREFUSED comes back on the receive side
    await until(lambda: contexts, "the exception handler")
    [context] = contexts
    assert str(context["exception"]) == "error_received failed"
    assert isinstance(proto.errors[0], ConnectionRefusedError)
    assert not transport.is_closing()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(dead)
        peer.sendto(b"still reading", transport.get_extra_info("sockname"))
        await until(lambda: proto.datagrams, "a datagram after the failure")
    assert proto.datagrams == [b"still reading"]
    transport.close()
    assert await asyncio.wait_for(proto.closed, 5) is None


@pytest.mark.asyncio
async def test_error_received_raising_on_a_send_error_propagates_from_sendto():
    # asyncio (and uvloop) call error_received inside sendto(), so its exception
    # reaches sendto()'s caller; the transport stays open
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Raising, local_addr=("127.0.0.1", 0))
    me = transport.get_extra_info("sockname")
    proto.fail_error = True
    try:
        with pytest.raises(RuntimeError, match="error_received failed"):
            transport.sendto(b"x" * 70000, me)
        proto.fail_error = False
        assert not transport.is_closing()
        transport.sendto(b"fine", me)
        await until(lambda: proto.datagrams, "a datagram to itself")
        assert proto.datagrams == [b"fine"]
    finally:
        transport.close()


# --- the empty datagram ----------------------------------------------------------------


def asyncio_sends_empty_datagrams() -> bool:
    """Whether this Python's asyncio sends a zero-length datagram for sendto(b"").

    gh-115199 (3.13) removed the ``if not data: return`` of
    _SelectorDatagramTransport.sendto; 3.11 and 3.12 (checked: 3.12.1) still have it.
    """
    try:
        source = inspect.getsource(selector_events._SelectorDatagramTransport.sendto)
    except (OSError, TypeError):  # no source shipped
        return sys.version_info >= (3, 13)
    return "if not data" not in source


@pytest.mark.asyncio
async def test_empty_datagram_is_sent_where_asyncio_sends_it():
    sends_empty = asyncio_sends_empty_datagrams()
    if sends_empty:
        skip_on_uvloop("its sendto(b'') sends nothing, as asyncio did before 3.13")
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    dest = receiver.get_extra_info("sockname")
    sender, sproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    sender.sendto(b"", dest)
    sender.sendto(bytearray(), dest)
    sender.sendto(b"marker", dest)
    await until(lambda: b"marker" in rproto.datagrams, "the marker")
    await asyncio.sleep(0.01)
    assert rproto.datagrams == ([b"", b"", b"marker"] if sends_empty else [b"marker"])
    assert sproto.errors == []
    sender.close()
    receiver.close()


# --- contextvars -----------------------------------------------------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")
counter: contextvars.ContextVar[int] = contextvars.ContextVar("counter", default=0)


class Traced(Log):
    """Notes (callback, request_id, counter) as each callback sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, int]] = []

    def note(self, what: str) -> None:
        self.seen.append((what, request_id.get(), counter.get()))

    def connection_made(self, transport):
        super().connection_made(transport)
        self.note("connection_made")
        counter.set(100)  # asyncio: another copy, not seen by the read callbacks

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        self.note("datagram_received")
        counter.set(counter.get() + 1)  # asyncio: seen by the next read callback

    def error_received(self, exc):
        super().error_received(exc)
        self.note("error_received")
        counter.set(counter.get() + 10)

    def connection_lost(self, exc):
        self.note("connection_lost")
        super().connection_lost(exc)


@pytest.mark.asyncio
async def test_datagram_callbacks_run_in_the_contexts_asyncio_gives_them():
    # asyncio: connection_made in a copy of the creator's context; the reader is added
    # by a call_soon from the creator's context and every read callback (datagram_
    # received, and error_received for a receive error) runs in that one copy, so
    # their changes carry over; connection_lost runs in a copy of close()'s caller's
    skip_on_uvloop(
        "connection_made and the read callbacks share one context, and connection_lost "
        "runs in it too"
    )
    loop = asyncio.get_running_loop()
    dead = dead_udp_address()
    request_id.set("creator")
    transport, proto = await loop.create_datagram_endpoint(Traced, remote_addr=dead)
    request_id.set("sender")
    transport.sendto(b"anyone?")
    await until(lambda: proto.errors, "error_received")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(dead)
        for i in range(2):
            peer.sendto(b"%d" % i, transport.get_extra_info("sockname"))
        await until(lambda: len(proto.datagrams) >= 2, "2 datagrams")
    request_id.set("closer")
    transport.close()
    await asyncio.wait_for(proto.closed, 5)
    assert proto.seen == [
        ("connection_made", "creator", 0),
        ("error_received", "creator", 0),
        ("datagram_received", "creator", 10),
        ("datagram_received", "creator", 11),
        ("connection_lost", "closer", 0),
    ]
    assert counter.get() == 0


# --- callbacks that act on the transport -----------------------------------------------


class Acting(Log):
    """Calls ``action(self)`` from datagram_received for the first datagram."""

    def __init__(self, action) -> None:
        super().__init__()
        self.action = action

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        action, self.action = self.action, None
        if action is not None:
            action(self)


def five_to(transport) -> None:
    """Datagrams b"0" .. b"4" to the transport, from a plain socket, now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        for i in range(5):
            peer.sendto(b"%d" % i, transport.get_extra_info("sockname"))


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "abort"])
async def test_closing_in_datagram_received_delivers_nothing_more(how):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Acting(lambda p: getattr(p.transport, how)()), local_addr=("127.0.0.1", 0)
    )
    five_to(transport)
    assert await asyncio.wait_for(proto.closed, 5) is None
    await asyncio.sleep(0.02)
    assert [e[0] for e in proto.events] == ["made", "datagram", "lost"]
    assert proto.datagrams == [b"0"]


@pytest.mark.asyncio
async def test_set_protocol_in_datagram_received_sends_the_rest_to_the_new_protocol():
    loop = asyncio.get_running_loop()
    new = Log()

    def switch(p):
        p.transport.set_protocol(new)
        assert p.transport.get_protocol() is new

    transport, old = await loop.create_datagram_endpoint(
        lambda: Acting(switch), local_addr=("127.0.0.1", 0)
    )
    five_to(transport)
    await until(lambda: len(new.datagrams) >= 4, "4 datagrams for the new protocol")
    transport.close()
    assert await asyncio.wait_for(new.closed, 5) is None
    assert old.datagrams == [b"0"] and [e[0] for e in old.events] == ["made", "datagram"]
    assert new.datagrams == [b"1", b"2", b"3", b"4"]
    assert [e[0] for e in new.events] == ["datagram"] * 4 + ["lost"]  # no connection_made


@pytest.mark.asyncio
async def test_pause_reading_in_datagram_received_holds_datagrams_until_resume():
    skip_on_uvloop("its UDP transport has no pause_reading/resume_reading/is_reading")
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Acting(lambda p: p.transport.pause_reading()), local_addr=("127.0.0.1", 0)
    )
    assert transport.is_reading()
    five_to(transport)
    await until(lambda: proto.datagrams, "the first datagram")
    await asyncio.sleep(0.05)
    assert proto.datagrams == [b"0"]
    assert not transport.is_reading()
    transport.resume_reading()
    assert transport.is_reading()
    await until(lambda: len(proto.datagrams) >= 5, "the held datagrams")
    assert proto.datagrams == [b"0", b"1", b"2", b"3", b"4"]
    transport.close()
    assert not transport.is_reading()
    await proto.closed


@pytest.fixture(params=["asyncio", "uvloop", "uringloop"])
def plain_loop(request):
    """A loop of each kind not running yet, for tests that run_forever() themselves."""
    factories = _factories()
    if request.param not in factories:
        pytest.skip(f"{request.param} is not installed for this interpreter")
    loop = factories[request.param]()
    yield loop
    if not loop.is_closed():
        loop.close()


def test_loop_stopped_in_datagram_received_delivers_the_rest_on_the_next_run(plain_loop):
    loop = plain_loop
    transport, proto = loop.run_until_complete(
        loop.create_datagram_endpoint(
            lambda: Acting(lambda p: loop.stop()), local_addr=("127.0.0.1", 0)
        )
    )
    five_to(transport)
    fired = []
    failsafe = loop.call_later(3, lambda: (fired.append(True), loop.stop()))
    loop.run_forever()
    failsafe.cancel()
    assert not fired, "datagram_received did not stop the loop"
    first_run = list(proto.datagrams)
    assert first_run and first_run == [b"0", b"1", b"2", b"3", b"4"][: len(first_run)]
    loop.run_until_complete(until(lambda: len(proto.datagrams) >= 5, "the rest"))
    loop.run_until_complete(asyncio.sleep(0.01))
    assert proto.datagrams == [b"0", b"1", b"2", b"3", b"4"]
    transport.close()
    loop.run_until_complete(asyncio.wait_for(proto.closed, 5))


# --- the datagram sock_* methods -------------------------------------------------------


def sock_pair() -> tuple[socket.socket, socket.socket]:
    """(a, b): bound, non-blocking UDP sockets on loopback."""
    a = udp_socket()
    b = udp_socket(rcvbuf=1 << 20)
    return a, b


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["sock_recvfrom", "sock_recvfrom_into"])
async def test_sock_recv_cancel_storm_loses_and_duplicates_nothing(method):
    # Receives are cancelled only while the future they wait on is pending (the
    # task's _fut_waiter): once the loop has completed that future, a cancel() before
    # the task resumes would throw away a datagram the loop did deliver, on any loop.
    skip_on_uvloop("its sock_recvfrom/sock_recvfrom_into/sock_sendto raise NotImplementedError")
    loop = asyncio.get_running_loop()
    rng = random.Random(4242)
    n = 300
    a, b = sock_pair()
    dest = b.getsockname()
    received: list[bytes] = []
    tasks: set[asyncio.Task] = set()
    cancels = 0

    async def receive() -> bytes:
        if method == "sock_recvfrom":
            data, src = await loop.sock_recvfrom(b, 64)
        else:
            buf = bytearray(64)
            nbytes, src = await loop.sock_recvfrom_into(b, buf)
            data = bytes(buf[:nbytes])
        assert src == a.getsockname()
        return bytes(data)

    def harvest() -> None:
        for t in [t for t in tasks if t.done()]:
            tasks.discard(t)
            if not t.cancelled():
                received.append(t.result())

    def waiting(t: asyncio.Task) -> bool:
        waiter = getattr(t, "_fut_waiter", None)
        return not t.done() and waiter is not None and not waiter.done()

    async def storm() -> None:
        nonlocal cancels
        sent = 0
        while len(received) < n:
            harvest()
            while len(tasks) < 8:
                tasks.add(asyncio.create_task(receive()))
            if sent < n and rng.random() < 0.6:
                assert await loop.sock_sendto(a, b"%06d" % sent, dest) == 6
                sent += 1
            for t in list(tasks):
                if rng.random() < 0.3 and waiting(t):
                    t.cancel()
                    cancels += 1
            for _ in range(rng.randint(1, 3)):
                await asyncio.sleep(0)
            harvest()

    with a, b:
        try:
            await asyncio.wait_for(storm(), 10)
        except asyncio.TimeoutError:
            missing = sorted(set(range(n)) - {int(d) for d in received})
            raise AssertionError(f"lost {len(missing)} datagrams, e.g. {missing[:10]}") from None
        finally:
            for t in tasks:  # everything was received: these must not get anything
                t.cancel()
            leftovers = await asyncio.gather(*tasks, return_exceptions=True)
        extra = [r for r in leftovers if not isinstance(r, BaseException)]
        assert extra == [], f"received after the end: {extra}"
        counts = collections.Counter(int(d) for d in received)
        assert sorted(counts) == list(range(n))
        assert [k for k, c in counts.items() if c > 1] == []
        assert cancels > 50
        await asyncio.sleep(0.01)
        assert read_all_now(b) == []


@pytest.mark.asyncio
async def test_sock_recvfrom_truncates_and_discards_the_rest_of_the_datagram():
    skip_on_uvloop("its sock_recvfrom raises NotImplementedError")
    loop = asyncio.get_running_loop()
    a, b = sock_pair()
    with a, b:
        await loop.sock_sendto(a, b"0123456789", b.getsockname())
        await loop.sock_sendto(a, b"next", b.getsockname())
        data, src = await asyncio.wait_for(loop.sock_recvfrom(b, 4), 5)
        assert data == b"0123" and src == a.getsockname()
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(b, 4096), 5)
        assert data == b"next"


@pytest.mark.asyncio
async def test_sock_recvfrom_into_nbytes_truncates_and_discards_the_rest():
    skip_on_uvloop("its sock_recvfrom_into raises NotImplementedError")
    loop = asyncio.get_running_loop()
    a, b = sock_pair()
    with a, b:
        await loop.sock_sendto(a, b"0123456789", b.getsockname())
        await loop.sock_sendto(a, b"next", b.getsockname())
        buf = bytearray(b"." * 8)
        n, src = await asyncio.wait_for(loop.sock_recvfrom_into(b, buf, 3), 5)
        assert n == 3 and buf == b"012....." and src == a.getsockname()
        n, _ = await asyncio.wait_for(loop.sock_recvfrom_into(b, buf), 5)
        assert n == 4 and buf == b"next...."
        # a buffer smaller than the datagram: filled, the rest discarded
        await loop.sock_sendto(a, b"0123456789", b.getsockname())
        await loop.sock_sendto(a, b"last", b.getsockname())
        small = bytearray(5)
        n, _ = await asyncio.wait_for(loop.sock_recvfrom_into(b, small), 5)
        assert n == 5 and small == b"01234"
        n, _ = await asyncio.wait_for(loop.sock_recvfrom_into(b, buf), 5)
        assert bytes(buf[:n]) == b"last"


@pytest.mark.asyncio
async def test_sock_recvfrom_into_nbytes_beyond_the_buffer_raises_value_error():
    skip_on_uvloop("its sock_recvfrom_into raises NotImplementedError")
    loop = asyncio.get_running_loop()
    a, b = sock_pair()
    with a, b:
        await loop.sock_sendto(a, b"kept", b.getsockname())
        with pytest.raises(ValueError):
            await asyncio.wait_for(loop.sock_recvfrom_into(b, bytearray(4), 5), 5)
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(b, 100), 5)
        assert data == b"kept"


@pytest.mark.asyncio
async def test_sock_sendto_returns_the_size_and_raises_emsgsize_for_oversized():
    skip_on_uvloop("its sock_sendto raises NotImplementedError")
    loop = asyncio.get_running_loop()
    a, b = sock_pair()
    with a, b:
        assert await loop.sock_sendto(a, memoryview(b"x" * 65000), b.getsockname()) == 65000
        assert await loop.sock_sendto(a, b"", b.getsockname()) == 0
        with pytest.raises(OSError) as info:
            await loop.sock_sendto(a, b"x" * 70000, b.getsockname())
        assert info.value.errno == errno.EMSGSIZE
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(b, 70000), 5)
        assert data == b"x" * 65000
        data, src = await asyncio.wait_for(loop.sock_recvfrom(b, 70000), 5)
        assert data == b"" and src == a.getsockname()  # the empty datagram is one


# --- uringloop's ZeroCopyBuffer --------------------------------------------------------


@pytest.mark.asyncio(loop_factories=["uringloop"])
@pytest.mark.parametrize("size", [100, 60000])
async def test_zerocopy_buffer_sent_with_sendto_arrives_intact(size):
    # uringloop only: asyncio and uvloop have no loop.alloc_zerocopy_buffer()
    loop = asyncio.get_running_loop()
    receiver, rproto = await loop.create_datagram_endpoint(Log, local_addr=("127.0.0.1", 0))
    sender, sproto = await loop.create_datagram_endpoint(
        Log, remote_addr=receiver.get_extra_info("sockname")
    )
    buf = loop.alloc_zerocopy_buffer(size)
    want = payload(7, size)
    memoryview(buf)[:] = want
    try:
        sender.sendto(buf)
        await until(lambda: rproto.datagrams, "the datagram")
        assert_same_datagrams(rproto.datagrams, [want])
        assert sproto.errors == []
        await asyncio.wait_for(buf.released, 5)
    finally:
        sender.close()
        receiver.close()
    await asyncio.wait_for(asyncio.gather(sproto.closed, rproto.closed), 5)
