"""Resource limits, met for real: file descriptors, locked memory, a tiny CQ, a ring refused.

- RLIMIT_NOFILE: a server that runs out of descriptors while accepting says so as
  asyncio's loop does ("socket.accept() out of system resource"), backs off instead of
  spinning, and accepts again once descriptors are free (a child process with a low
  limit, on uringloop and on asyncio's loop, driven by clients here).
- RLIMIT_MEMLOCK: without CAP_IPC_LOCK, io_uring charges rings, buffer rings,
  registered buffers and SEND_ZC pins to the limit; what cannot be had degrades.
- A CQ of 8 or 16 entries (URINGLOOP_CQ_ENTRIES) flooded by multishot accepts, receives
  and datagram receives: the kernel holds the overflow (and ends multishot requests
  whose next CQE does not fit), and nothing is lost, reordered or delivered twice.
- io_uring_setup failing with ENOMEM once loops exist: the error names the cause, the
  policy falls back, and the loops already made go on.

The children are tests/rlimit_child.py (see its docstring).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

import uringloop
from uringloop import _ring

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "rlimit_child.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by Python


def run_child(*args: str, timeout: float = 60) -> dict:
    proc = subprocess.run(
        [sys.executable, "-W", "error", CHILD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no warning, no "Exception ignored"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ RLIMIT_NOFILE


class NofileServer:
    """The child's echo server, asked for its state over stdin/stdout."""

    def __init__(self, loop_name: str, *limits: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-W", "error", CHILD, "nofile", loop_name, *map(str, limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self.pending = b""

    def line(self, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError("the child did not answer")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                self.proc.wait(10)
                raise AssertionError(f"the child exited: {self.proc.stderr.read().decode()}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command.encode() + b"\n")
        return self.line()

    def cpu_seconds(self) -> float:
        """User + system time of the whole process (its io-wq threads included)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> tuple[dict, str]:
        report = self.ask("stop")
        self.proc.wait(20)
        err = self.proc.stderr.read().decode()
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return report, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()


def echoes(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets among `socks` that got their byte back within `timeout`."""
    answered: list[socket.socket] = []
    waiting = set(socks)
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select(list(waiting), [], [], left)
        if not ready:
            break
        for s in ready:
            assert s.recv(16) == b"x"
            waiting.discard(s)
            answered.append(s)
    return answered


def connect(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"x")
        socks.append(s)
    return socks


@pytest.mark.parametrize("loop_name", ["asyncio", "uringloop"])
def test_out_of_descriptors_while_accepting_backs_off_and_recovers(loop_name):
    """EMFILE on accept: asyncio's message, a retry every ACCEPT_RETRY_DELAY without
    spinning, and the connections that waited in the backlog served once fds are free."""
    server = NofileServer(loop_name, 64)
    clients: list[socket.socket] = []
    try:
        ready = server.line()
        port, free = ready["port"], ready["free"]
        assert 10 < free < 64
        # more connections than the server has descriptors for; the rest wait in the
        # listening socket's backlog (the kernel completed their handshakes)
        clients = connect(port, free + 20)
        served: list[socket.socket] = []
        deadline = time.monotonic() + 10
        while True:
            served += echoes([c for c in clients if c not in served], 0.2)
            status = server.ask("status")
            if status["records"] and status["connections"] == len(served):
                break
            assert time.monotonic() < deadline, (status, len(served))
        assert 0 < len(served) <= free < len(clients)
        first = status["records"][0]
        assert first["message"] == "socket.accept() out of system resource"
        assert first["errno"] == errno.EMFILE

        # out of descriptors: retries, no spinning, nobody else served
        cpu_before, t_before = server.cpu_seconds(), time.monotonic()
        time.sleep(1.6)
        cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - t_before)
        assert cpu < 0.25, f"{cpu:.2f} of a core while out of descriptors"
        assert echoes([c for c in clients if c not in served], 0) == []
        status = server.ask("status")
        exhausted_key = (status["acceptor"] or {}).get("key")
        records = status["records"]
        assert len(records) >= 2  # the first, and at least one retry since
        assert {(r["message"], r["errno"]) for r in records} == {
            ("socket.accept() out of system resource", errno.EMFILE)
        }
        gaps = [b["t"] - a["t"] for a, b in zip(records, records[1:], strict=False)]
        if loop_name == "uringloop":
            # one complaint per attempt, an attempt per ACCEPT_RETRY_DELAY. (asyncio's
            # selector loop of 3.11-3.14 goes on with its accept loop after the first
            # EMFILE: backlog + 1 complaints and as many retries scheduled per attempt,
            # CPython gh-151615.)
            assert min(gaps) > 0.9 * asyncio.constants.ACCEPT_RETRY_DELAY, gaps
            span = status["t"] - first["t"]
            assert len(records) <= 2 + span / asyncio.constants.ACCEPT_RETRY_DELAY

        # the served clients leave: their server sides close, the backlog is accepted
        waiting = [c for c in clients if c not in served]
        for c in served:
            c.close()
        late = echoes(waiting, 10)
        assert len(late) == len(waiting)
        fresh = connect(port, 10)
        clients += fresh
        assert len(echoes(fresh, 10)) == len(fresh)
        status = server.ask("status")
        logged = len(status["records"])
        if loop_name == "uringloop":
            # the multishot ACCEPT was armed again (a new request) and is still armed
            assert status["acceptor"]["listed"]
            assert status["acceptor"]["key"] not in (None, exhausted_key)
        for c in clients:
            c.close()
        report, err = server.stop()
    finally:
        server.kill()
        for c in clients:
            c.close()
    assert err == ""
    assert report["connections"] == len(clients)
    if loop_name == "uringloop":
        assert len(report["records"]) == logged  # no more complaints once served
        assert report["ring"]["inflight"] == 0 and report["ring"]["records"] == 0


@pytest.mark.parametrize("loop_name", ["asyncio", "uringloop"])
def test_a_limit_raised_after_listening_applies_to_the_next_accept(loop_name):
    """`resource.setrlimit(RLIMIT_NOFILE, ...)` raised after the server started: the
    connections past the old limit are accepted at once, with no complaint. (io_uring
    reads the limit when an ACCEPT is prepared: the multishot ACCEPT armed at
    create_server() still has the old one, and fails with EMFILE at it.)"""
    server = NofileServer(loop_name, 64, 1024)
    clients: list[socket.socket] = []
    try:
        port = server.line()["port"]
        clients = connect(port, 100)
        assert len(echoes(clients, 0.9)) == len(clients)  # (within a retry delay)
        report, err = server.stop()
    finally:
        server.kill()
        for c in clients:
            c.close()
    assert err == ""
    assert report["records"] == [] and report["connections"] == len(clients)


# ------------------------------------------------------------------ a CQ that overflows


def cq_overflow_flag(loop) -> ctypes.c_uint | None:
    """The kernel's SQ-ring flags word of this loop's ring (IORING_SQ_CQ_OVERFLOW is
    set while completions wait outside a full CQ), or None where liburing's struct
    io_uring is not laid out as this reads it (khead, ktail, kring_mask, kring_entries,
    kflags: the fifth pointer of struct io_uring_sq)."""
    if _ring.ffi.offsetof("struct io_uring_sq", "ring_entries") != 92:
        return None
    base = int(_ring.ffi.cast("uintptr_t", loop._ring_setup.ring))
    return ctypes.c_uint.from_address(ctypes.c_void_p.from_address(base + 32).value)


IORING_SQ_CQ_OVERFLOW = 2


class OverflowWitness:
    """Counts callbacks that ran while the kernel held completions past a full CQ."""

    def __init__(self, loop) -> None:
        self.flags = cq_overflow_flag(loop)
        self.calls = self.overflowed = 0

    def look(self) -> None:
        self.calls += 1
        if self.flags is not None and self.flags.value & IORING_SQ_CQ_OVERFLOW:
            self.overflowed += 1


async def flood(loop, streams: int, datagrams: int) -> dict:
    witness = OverflowWitness(loop)
    served: list[asyncio.Transport] = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            served.append(transport)

        def data_received(self, data):
            witness.look()
            self.transport.write(data)

    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=512)
    address = server.sockets[0].getsockname()

    def connect_all(n: int, first: int) -> list[tuple[socket.socket, bytes]]:
        """n connections, each with 48 KiB of its own sent before the loop runs again:
        one multishot ACCEPT brings them all, and every multishot recv has data."""
        pairs = []
        for i in range(first, first + n):
            c = socket.create_connection(address, timeout=10)
            data = i.to_bytes(4, "big") * (12 << 10)
            c.sendall(data)
            c.setblocking(False)
            pairs.append((c, data))
        return pairs

    async def exchange(c: socket.socket, first: bytes) -> None:
        """The echo of what was sent before, then a second round: the streams whose
        multishot recv the overflow ended must have been armed again."""
        got = bytearray()
        while len(got) < len(first):
            got += await loop.sock_recv(c, 1 << 16)
        assert got == first, "an echo lost, duplicated or reordered bytes"
        more = os.urandom(64 << 10)
        back = bytearray()

        async def read_back():
            while len(back) < len(more):
                back.extend(await loop.sock_recv(c, 1 << 16))

        await asyncio.gather(loop.sock_sendall(c, more), read_back())
        assert back == more, "the second round lost, duplicated or reordered bytes"

    pairs = connect_all(streams, 0)
    await asyncio.wait_for(asyncio.gather(*(exchange(c, d) for c, d in pairs)), 30)
    assert len(served) == streams
    # the multishot ACCEPT the overflow ended was armed again
    later = connect_all(20, streams)
    await asyncio.wait_for(asyncio.gather(*(exchange(c, d) for c, d in later)), 30)
    assert len(served) == streams + 20
    for c, _ in pairs + later:
        c.close()
    for t in served:
        t.close()
    server.close()
    await server.wait_closed()

    # datagrams: a burst waiting in the socket before one multishot RECVMSG takes them
    got: list[int] = []
    enough = loop.create_future()
    want = datagrams

    class Collect(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            witness.look()
            got.append(int.from_bytes(data[:4], "big"))
            if len(got) == want and not enough.done():
                enough.set_result(None)

    rsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rsock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    except PermissionError:
        rsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    rsock.bind(("127.0.0.1", 0))
    transport, _ = await loop.create_datagram_endpoint(Collect, sock=rsock)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for i in range(datagrams):
            sender.sendto(i.to_bytes(4, "big") + b"d" * 60, rsock.getsockname())
        await asyncio.wait_for(enough, 20)
        assert got == list(range(datagrams)), "datagrams lost, duplicated or reordered"
        # and the receive goes on after the overflow ended it
        want = datagrams + 50
        enough = loop.create_future()
        for i in range(datagrams, want):
            sender.sendto(i.to_bytes(4, "big"), rsock.getsockname())
        await asyncio.wait_for(enough, 20)
        assert got == list(range(want))
    transport.close()
    await asyncio.sleep(0)
    return {
        "overflowed": witness.overflowed,
        "calls": witness.calls,
        "layout": witness.flags is not None,
    }


@pytest.mark.parametrize(
    "cq_entries, setup", [(8, "auto"), (16, "auto"), (16, "coop")], ids=["cq8", "cq16", "cq16-coop"]
)
def test_cq_overflow_under_a_flood_of_multishot_completions_loses_nothing(
    monkeypatch, cq_entries, setup
):
    """200 connections accepted at once, 200 streams with data waiting, 200 sock_recv
    and sock_sendall at once, 2,000 datagrams in one burst, on a CQ of 8 or 16."""
    monkeypatch.setenv("URINGLOOP_CQ_ENTRIES", str(cq_entries))
    loop = uringloop.new_event_loop(setup=setup)
    try:
        info = loop.ring_info()
        assert info["cq_entries"] == cq_entries and info["sq_entries"] <= cq_entries
        result = loop.run_until_complete(flood(loop, 200, 2000))
        stats = loop.ring_info()
        dgram = loop._ring.datagram_stats()
    finally:
        loop.close()
    if result["layout"]:
        # the flood did overflow the CQ: callbacks ran while the kernel held the rest
        assert result["overflowed"] > 0, result
    assert stats["stray_cqes"] == 0
    assert stats["recv_buffers_out"] == 0 and dgram["buffers_out"] == 0
    assert dgram["received"] == 2050
    after = loop._ring.stats()
    assert after["inflight"] == 0 and after["records"] == 0, after
    assert after["recv_buffers_out"] == 0
    assert loop._ring.datagram_stats()["buffers_out"] == 0


# ------------------------------------------------------------------ RLIMIT_MEMLOCK


@pytest.fixture(scope="module")
def memlock_512k() -> dict:
    return run_child("memlock", str(512 << 10))


def test_memlock_of_64_kib_from_the_start():
    """RLIMIT_MEMLOCK at 64 KiB (the kernel's default before 5.16) without CAP_IPC_LOCK."""
    report = run_child("memlock", str(64 << 10))
    # The kernel charges the ring itself to the limit: set-up halves it until it fits
    assert "unavailable" not in report, report.get("unavailable")
    assert report["ring_info"]["sq_entries"] < 1024
    check_degraded(report)


def check_degraded(report: dict) -> None:
    """Everything went through, byte-exact, whatever could not be had."""
    assert report["errors"] == []
    assert report["stream_intact"] and report["stream_bytes"] == (4 << 20) + 4000 + (256 << 10)
    assert report["sendzc_intact"] and report["sendzc_sent"] == 2 << 20
    assert report["datagrams_all_there"] and report["datagrams_in_order"]
    zc = report["zerocopy_stats"]
    # the arena (16 MiB by default) halved until it could be registered, or none
    assert report["zerocopy_buffer_registered"] == (zc["registered_pool_bytes"] >= 256 << 10)
    assert zc["registered_pool_bytes"] < report["memlock"]
    # SEND_ZC refused (ENOMEM past the limit), or not tried (datagrams past the
    # budget RLIMIT_MEMLOCK leaves): the sockets copy instead
    assert zc["copy_fallback_sockets"] >= 1 or zc["zc_sends"] == 0
    assert zc["zc_notifications"] == zc["zc_sends"] + report["datagram_stats"]["zc_sends"]
    for stats in (report["after_close"], report["zerocopy_after_close"]):
        assert stats.get("inflight", 0) == stats.get("records", 0) == 0
        assert stats.get("pinned_bytes", 0) == stats.get("pinned_buffers", 0) == 0
    assert report["after_close"]["recv_buffers_out"] == 0
    assert report["datagram_after_close"]["buffers_out"] == 0
    assert report["zerocopy_after_close"]["zerocopy_buffer_bytes"] == 0


def test_memlock_of_512_kib_degrades_what_does_not_fit(memlock_512k):
    """Under 512 KiB the ring fits; the zero-copy arena shrinks and SEND_ZC, refused,
    gives way to copying, on streams, sock_sendzc and datagrams alike."""
    check_degraded(memlock_512k)
    assert memlock_512k["ring_info"]["recv_buffer_ring"]
    assert memlock_512k["datagram_stats"]["buffer_ring"]


def test_datagrams_keep_their_order_when_memlock_refuses_zero_copy(memlock_512k):
    """A SEND_ZC refused with ENOMEM would go again after the datagrams of its batch that
    went: datagrams past the budget RLIMIT_MEMLOCK leaves are copied instead (every
    large datagram of a burst of 300 arrived after the small ones before)."""
    order = memlock_512k["datagram_order"]
    assert order == sorted(order)


# ------------------------------------------------------------------ a ring refused later


def test_a_ring_refused_with_enomem_after_loops_exist():
    """io_uring_setup fails with ENOMEM (a seccomp filter makes it) once two loops run:
    a new loop is refused with the reason, the policy falls back to asyncio's loop as
    README.md says ("When io_uring is not available"), and the two loops go on."""
    report = run_child("ring-enomem")
    assert report["before"] == report["after"] and min(report["after"]) > 0
    err = report["new_event_loop"]
    assert err["errno"] == errno.ENOMEM
    assert "RLIMIT_MEMLOCK" in err["message"] and "ulimit -l" in err["message"]
    assert report["run"] == errno.ENOMEM  # uringloop.run() raises the same
    # install(): asyncio.run() gets asyncio's loop, and says so once (warning + log)
    assert report["installed_loop"] == "_UnixSelectorEventLoop"
    assert report["installed_echo"] > 0
    assert len(report["warnings"]) == 1 and "falling back" in report["warnings"][0]
    assert report["log_records"] == report["warnings"]
    assert report["fallback_false"] == errno.ENOMEM
    for stats in report["closed"]:
        assert stats["inflight"] == 0 and stats["records"] == 0 and stats["recv_buffers_out"] == 0
