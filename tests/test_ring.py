"""uringloop's own ring machinery: set-up rungs, threads, fork, overflow, draining, syscalls."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading

import pytest
from conftest import require_setup

import uringloop

HERE = os.path.dirname(os.path.abspath(__file__))
only_uringloop = pytest.mark.asyncio(loop_factories=["uringloop"])


def roundtrip(loop: asyncio.AbstractEventLoop) -> bytes:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        loop.run_until_complete(loop.sock_sendall(a, b"abc"))
        return loop.run_until_complete(loop.sock_recv(b, 10))


@pytest.mark.parametrize("setup", ["defer", "coop", "plain"])
def test_every_setup_rung_runs_io(setup):
    require_setup(setup)
    loop = uringloop.UringEventLoop(setup=setup)
    try:
        assert roundtrip(loop) == b"abc"
        info = loop.ring_info()
        assert info["cq_entries"] > info["sq_entries"]
        if setup == "defer":
            assert {"SINGLE_ISSUER", "DEFER_TASKRUN"} <= set(info["flags"])
    finally:
        loop.close()


def test_unknown_setup_is_a_value_error():
    with pytest.raises(ValueError, match="unknown ring setup"):
        uringloop.UringEventLoop(setup="turbo")


def test_loop_built_in_one_thread_runs_in_another():
    loop = uringloop.new_event_loop()
    result = []
    t = threading.Thread(target=lambda: result.append(roundtrip(loop)))
    t.start()
    t.join(30)
    assert result == [b"abc"]
    if "SINGLE_ISSUER" in loop.ring_info()["flags"]:
        # The ring now belongs to that thread; another one gets a clear error.
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="SINGLE_ISSUER"):
            loop.run_until_complete(coro)
        coro.close()
    loop.close()


def test_forked_child_refuses_the_parents_ring_and_builds_its_own():
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "fork_child.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == 0
    child = report["child"]
    assert "created in the parent process" in child["parent_loop"]
    assert child["fresh_loop"] == "child"
    assert child["parent_loop_closed"] is True
    assert report["parent"] == "parent"


def test_fork_with_requests_prepared_and_in_flight_leaves_the_parent_intact():
    """The child's SQEs would land in the slots the parent fills next (shared memory)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "fork_inflight_child.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == 0, report  # the child neither crashed nor hung
    parent = report["parent"]
    assert parent == {
        "A_peer_saw_the_abort": True,
        "C_intact": True,
        "B_to_server_intact": True,
        "B_to_client_intact": True,
        "stray_cqes": 0,
        "closed_cleanly": True,
    }, report
    child = report["child"]
    # what would touch the ring raises with the reason; close() and abort() are inert
    for name in ("C", "B", "Bc", "A"):
        for action in ("resume_reading", "pause_reading", "write", "write_eof"):
            assert "forked child" in child[f"{name}.{action}"], (name, action, child)
        assert child[f"{name}.close"] == "ok" and child[f"{name}.abort"] == "ok", child
    assert "forked child" in child["sock_recv"]


@pytest.mark.parametrize("recv", ["multishot", "single-shot"])
def test_fork_inside_a_protocol_callback_stops_the_child_not_the_parent(recv):
    """The child returns into the parent's completion batch: RuntimeError, no crash."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "fork_in_callback_child.py"), recv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"child_exit": 3, "child_signal": None, "after_fork": "helloworld"}, report


@only_uringloop
async def test_cancel_from_inside_the_completion_keeps_the_record_table_sound():
    """A future whose set_result() cancels its own request (re-entry from a completion):
    the record is freed once, by the completion, so two later requests never share it."""
    loop = asyncio.get_running_loop()
    ring = loop._ring

    class CancellingFuture(asyncio.Future):
        key = None

        def set_result(self, result):
            super().set_result(result)
            self.cancel_result = ring.cancel(self.key)

    records = ring.stats()["records"]  # the loop's own (its wake-up poll)
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        fut = CancellingFuture(loop=loop)
        fut.key = ring.recv(a.fileno(), 100, fut, a)
        b.send(b"x")
        assert await asyncio.wait_for(fut, 5) == b"x"
        assert fut.cancel_result is False  # nothing left to cancel
        f1, f2 = loop.create_future(), loop.create_future()
        k1 = ring.recv(a.fileno(), 1, f1, a)
        k2 = ring.recv(a.fileno(), 1, f2, a)
        assert k1 & 0xFFFFFFFF != k2 & 0xFFFFFFFF  # two records, not one
        b.send(b"yz")
        assert sorted(await asyncio.wait_for(asyncio.gather(f1, f2), 5)) == [b"y", b"z"]
        assert ring.stats()["records"] == records
    finally:
        a.close()
        b.close()


@only_uringloop
async def test_more_completions_than_the_cq_holds_are_not_lost():
    loop = asyncio.get_running_loop()
    cq = loop.ring_info()["cq_entries"]
    count = cq + cq // 2
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    with a, b:
        # All sends complete inline at submission, within one loop iteration,
        # overflowing the CQ; the kernel holds the rest (NODROP) until we reap.
        sends = [loop.sock_sendall(a, b"x") for _ in range(count)]
        reader_total = 0

        async def drain():
            nonlocal reader_total
            while reader_total < count:
                reader_total += len(await loop.sock_recv(b, 1 << 16))

        await asyncio.wait_for(asyncio.gather(drain(), *sends), 60)
        assert reader_total == count
    info = loop.ring_info()
    assert info["stray_cqes"] == 0


@only_uringloop
async def test_close_drains_requests_and_releases_their_buffers():
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    bufs = [bytearray(100) for _ in range(8)]
    tasks = [asyncio.ensure_future(loop.sock_recv_into(b, buf)) for buf in bufs]
    await asyncio.sleep(0.01)
    assert loop.ring_info()["inflight"] >= 8
    # The kernel holds a view of each buffer: it cannot be resized under it.
    with pytest.raises(BufferError):
        bufs[0].extend(b"x")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert loop.ring_info()["inflight"] == 1  # only the self-pipe poll is left
    bufs[0].extend(b"x")  # released after the final CQEs
    a.close()
    b.close()


def test_loop_close_with_requests_in_flight_waits_for_their_final_cqes():
    loop = uringloop.new_event_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    buf = bytearray(64)
    task = loop.create_task(loop.sock_recv_into(b, buf))
    loop.run_until_complete(asyncio.sleep(0.01))
    assert loop.ring_info()["inflight"] >= 2
    refs_while_pending = sys.getrefcount(buf)
    assert loop._ring.close(10.0) == 0  # what loop.close() does after asyncio's teardown
    assert loop._ring.inflight == 0
    assert sys.getrefcount(buf) < refs_while_pending  # released only after the final CQE
    task.cancel()
    loop.close()
    a.close()
    b.close()


STRACE_SOCK_API = """
import asyncio, socket, uringloop

async def main():
    loop = asyncio.get_running_loop()
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    srv.setblocking(False)
    cli = socket.socket(); cli.setblocking(False)
    accept = asyncio.ensure_future(loop.sock_accept(srv))
    await loop.sock_connect(cli, srv.getsockname())
    conn, _ = await accept
    for _ in range(200):
        await loop.sock_sendall(cli, b"x" * 1024)
        got = b""
        while len(got) < 1024:
            got += await loop.sock_recv(conn, 4096)
        await loop.sock_sendall(conn, got)
        back = b""
        while len(back) < 1024:
            back += await loop.sock_recv(cli, 4096)
    for _ in range(100):
        # nothing there yet: the recv waits on the ring
        pending = asyncio.ensure_future(loop.sock_recv(conn, 4096))
        await asyncio.sleep(0)
        await loop.sock_sendall(cli, b"z")
        assert await pending == b"z"
    for s in (conn, cli, srv):
        s.close()

uringloop.run(main())
"""

STRACE_TRANSPORTS = """
import asyncio, uringloop

async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    class Echo(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t

        def data_received(self, data):
            self.t.write(data)

    class Client(asyncio.Protocol):
        n = 0

        def connection_made(self, t):
            self.t = t
            t.write(b"y" * 1024)

        def data_received(self, data):
            self.n += len(data)
            if self.n >= 400 * 1024:
                done.set_result(None)
            elif self.n % 1024 == 0:
                self.t.write(b"y" * 1024)

    server = await loop.create_server(Echo, "127.0.0.1", 0)
    t, _ = await loop.create_connection(Client, *server.sockets[0].getsockname())
    await done
    t.close()
    server.close()
    await server.wait_closed()

uringloop.run(main())
"""


def _strace_counts(tmp_path, source: str) -> dict[str, int]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed (the CI set-up installs it)")
    script = tmp_path / "traced.py"
    script.write_text(source)
    out = tmp_path / "strace.txt"
    proc = subprocess.run(
        [strace, "-f", "-c", "-o", str(out), sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    counts = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1].isidentifier() and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    for readiness in ("epoll_wait", "epoll_pwait", "select", "pselect6", "poll", "ppoll"):
        assert readiness not in counts, f"{readiness} was called: {counts}"
    return counts


def test_strace_transports_move_every_byte_through_io_uring_enter(tmp_path):
    counts = _strace_counts(tmp_path, STRACE_TRANSPORTS)
    assert counts.get("io_uring_enter", 0) >= 400, counts
    for direct_io in ("recvfrom", "sendto", "recvmsg", "sendmsg", "accept4"):
        assert counts.get(direct_io, 0) < 10, f"{direct_io} bypassed the ring: {counts}"


def test_strace_sock_api_tries_the_syscall_first_then_waits_on_the_ring(tmp_path):
    """As on asyncio's loop, sock_recv()/sock_sendall() first try the syscall (data or
    room already there: no suspension); only what would block goes to the ring."""
    counts = _strace_counts(tmp_path, STRACE_SOCK_API)
    assert counts.get("sendto", 0) >= 500, counts  # every sendall went out at once
    assert counts.get("recvfrom", 0) >= 500, counts  # every recv was tried first
    assert counts.get("io_uring_enter", 0) >= 100, counts  # the 100 that had to wait
    assert counts.get("accept4", 0) < 10 and counts.get("connect", 0) < 10, counts


def test_native_module_was_built_against_this_interpreter():
    from uringloop import _dataplane

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert _dataplane.__file__.endswith(suffix)


@pytest.mark.skipif(
    not os.environ.get("URINGLOOP_EXPECT_SANITIZERS"), reason="only in the sanitizer job"
)
def test_sanitizer_job_really_loaded_instrumented_native_code():
    from uringloop import _dataplane

    with open("/proc/self/maps") as f:
        maps = f.read()
    assert "libasan" in maps and "libubsan" in maps
    assert "site-packages" in _dataplane.__file__
