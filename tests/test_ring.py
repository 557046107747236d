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
import textwrap
import threading

import pytest

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
    probed = uringloop.probe()
    needed = {"defer": "DEFER_TASKRUN", "coop": "COOP_TASKRUN"}.get(setup)
    if needed and not probed.setup_flags[needed]:
        pytest.skip(f"this kernel has no {needed}")
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


def test_strace_shows_io_uring_enter_and_no_readiness_syscalls(tmp_path):
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed (the CI set-up installs it)")
    script = tmp_path / "echo.py"
    script.write_text(
        textwrap.dedent(
            """
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
                await asyncio.sleep(0.01)
                for s in (conn, cli, srv):
                    s.close()

                # the same through create_server/create_connection transports
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
                        if self.n >= 200 * 1024:
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
        )
    )
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
    assert counts.get("io_uring_enter", 0) >= 400, counts
    for readiness in ("epoll_wait", "epoll_pwait", "select", "pselect6", "poll", "ppoll"):
        assert readiness not in counts, f"{readiness} was called: {counts}"
    for direct_io in ("recvfrom", "sendto", "accept4", "connect"):
        assert counts.get(direct_io, 0) < 10, f"{direct_io} bypassed the ring: {counts}"


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
