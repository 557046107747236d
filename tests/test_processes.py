"""Subprocesses, signals and pipes, with real child processes and real signals.

Each test runs on asyncio's loop, uvloop and uringloop; the uringloop-only ones
check how it waits: a POLL on the child's pidfd, no SIGCHLD handler, no thread.
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pytest

CHILD_UPPER = (
    "import sys; data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data.upper()); "
    "sys.stderr.write('err'); sys.exit(3)"
)


@pytest.mark.asyncio
async def test_exec_with_pipes_communicate_and_returncode():
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD_UPPER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    payload = b"hello " * 100_000  # more than a pipe holds: both directions must flow
    out, err = await asyncio.wait_for(proc.communicate(payload), 30)
    assert out == payload.upper()
    assert err == b"err"
    assert proc.returncode == 3


@pytest.mark.asyncio
async def test_shell_and_wait():
    proc = await asyncio.create_subprocess_shell(
        "read line; echo got:$line; exit 7",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    proc.stdin.write(b"abc\n")
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert line == b"got:abc\n"
    assert await asyncio.wait_for(proc.wait(), 10) == 7


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "how, expected",
    [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL), ("send_signal", -signal.SIGUSR1)],
)
async def test_signalling_a_child(how, expected):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; print('up', flush=True); time.sleep(60)",
        stdout=asyncio.subprocess.PIPE,
    )
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"up\n"
    if how == "send_signal":
        proc.send_signal(signal.SIGUSR1)
    else:
        getattr(proc, how)()
    assert await asyncio.wait_for(proc.wait(), 10) == expected
    assert proc.returncode == expected


@pytest.mark.asyncio
async def test_many_children_at_once_each_get_their_own_status():
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", f"import sys; sys.exit({i})")
        for i in range(8)
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 30)
    assert codes == list(range(8))


@pytest.mark.asyncio
async def test_missing_program_raises_file_not_found():
    with pytest.raises(FileNotFoundError):
        await asyncio.create_subprocess_exec("/nonexistent/program")


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_uringloop_waits_for_children_with_a_pidfd_poll():
    loop = asyncio.get_running_loop()
    threads = threading.active_count()
    sigchld = signal.getsignal(signal.SIGCHLD)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(0.3)"
    )
    assert proc.pid in loop._child_pidfds
    pidfd = loop._child_pidfds[proc.pid]
    assert os.readlink(f"/proc/self/fd/{pidfd}") == "anon_inode:[pidfd]"
    assert threading.active_count() == threads  # no waiter thread
    assert signal.getsignal(signal.SIGCHLD) == sigchld  # no SIGCHLD handler
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert proc.pid not in loop._child_pidfds
    with pytest.raises(OSError):
        os.fstat(pidfd)  # closed once the child was reaped


@pytest.mark.asyncio
async def test_signal_handler_wakes_a_loop_sleeping_in_the_kernel():
    loop = asyncio.get_running_loop()
    got = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, lambda: got.set_result(time.monotonic()))
    try:
        # a real process sends the signal while the loop waits with nothing else to do
        killer = subprocess.Popen(["sh", "-c", f"sleep 0.2; kill -USR1 {os.getpid()}"])
        start = time.monotonic()
        woke = await asyncio.wait_for(got, 10)
        killer.wait()
        assert woke - start < 2.0
    finally:
        assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


@pytest.mark.asyncio
async def test_signal_handler_arguments_and_errors_match_asyncio():
    loop = asyncio.get_running_loop()
    seen = []
    loop.add_signal_handler(signal.SIGUSR2, seen.append, "arg")
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == ["arg"]
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)
    with pytest.raises((RuntimeError, ValueError)):
        loop.add_signal_handler(signal.SIGKILL, lambda: None)
    with pytest.raises((ValueError, OSError)):
        loop.add_signal_handler(4096, lambda: None)
    with pytest.raises(TypeError):
        loop.add_signal_handler(signal.SIGUSR2, asyncio.sleep)


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data):
        self.data += data

    def connection_lost(self, exc):
        self.done.set_result(exc)


async def through_pipe(rfd: int, wfd: int, payload: bytes) -> bytes:
    """Write payload into wfd with a write-pipe transport, read it from rfd with a read one."""
    loop = asyncio.get_running_loop()
    reader = Collect()
    rtransport, _ = await loop.connect_read_pipe(lambda: reader, os.fdopen(rfd, "rb", 0))
    wtransport, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(wfd, "wb", 0))
    wtransport.write(payload)
    wtransport.close()
    assert await asyncio.wait_for(reader.done, 10) is None
    rtransport.close()
    return bytes(reader.data)


@pytest.mark.asyncio
async def test_read_and_write_pipes():
    payload = os.urandom(1 << 20)
    assert await through_pipe(*os.pipe(), payload) == payload


@pytest.mark.asyncio
async def test_fifo_pipe(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert await through_pipe(rfd, wfd, b"through the fifo") == b"through the fifo"


@pytest.mark.asyncio
async def test_pty_pipe():
    loop = asyncio.get_running_loop()
    master, slave = pty.openpty()
    reader = Collect()
    rtransport, _ = await loop.connect_read_pipe(lambda: reader, os.fdopen(master, "rb", 0))
    try:
        os.write(slave, b"over a pty\n")
        for _ in range(200):
            if b"over a pty" in reader.data:
                break
            await asyncio.sleep(0.01)
        assert b"over a pty" in reader.data
    finally:
        rtransport.close()
        os.close(slave)


@pytest.mark.asyncio(loop_factories=["asyncio", "uringloop"])
async def test_regular_file_is_refused_as_a_pipe(tmp_path):
    # not on uvloop: libuv aborts the whole process on a regular file here
    loop = asyncio.get_running_loop()
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb") as f:
        with pytest.raises(ValueError):
            await loop.connect_read_pipe(asyncio.Protocol, f)


@pytest.mark.skipif(
    not hasattr(asyncio, "SafeChildWatcher"), reason="child watchers are gone (3.14)"
)
def test_uringloop_policy_keeps_child_watchers_and_honours_one_set():
    """Code written for the stdlib policy (3.11-3.13) sets a watcher: it is used."""
    import warnings

    import uringloop

    policy = uringloop.EventLoopPolicy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.SafeChildWatcher()
        policy.set_child_watcher(watcher)
        assert policy.get_child_watcher() is watcher
    used = []
    original = watcher.add_child_handler

    def spy(pid, callback, *args):
        used.append(pid)
        return original(pid, callback, *args)

    watcher.add_child_handler = spy
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(policy)
    loop = policy.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            watcher.attach_loop(loop)

        async def main():
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(5)")
            return proc.pid, await asyncio.wait_for(proc.wait(), 10)

        pid, code = loop.run_until_complete(main())
        assert code == 5
        assert used == [pid]
        assert not loop._child_pidfds
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            watcher.close()
        asyncio.set_event_loop(None)
        loop.close()
        asyncio.set_event_loop_policy(old)
