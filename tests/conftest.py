"""Shared fixtures: every async test runs on asyncio's loop, uvloop and uringloop.

pytest-asyncio's ``pytest_asyncio_loop_factories`` hook parametrizes each
``@pytest.mark.asyncio`` test over the three loops, so a behaviour that differs from
asyncio's shows up as a failing comparison. Tests about uringloop's own machinery
select it with ``@pytest.mark.asyncio(loop_factories=["uringloop"])``.
"""

from __future__ import annotations

import asyncio
import gc
import os

import pytest

import uringloop

try:
    import uvloop
except ImportError:  # uvloop has no wheel for this interpreter
    uvloop = None


_uringloops: list[uringloop.UringEventLoop] = []


def _tracked_uringloop() -> uringloop.UringEventLoop:
    loop = uringloop.new_event_loop()
    _uringloops.append(loop)
    return loop


@pytest.fixture(autouse=True)
def ring_leak_check():
    """After each test, every uringloop loop it ran has given everything back.

    Autouse fixtures are set up first and torn down last, so this runs after
    pytest-asyncio closed the test's loop: no request may still be in the kernel, no
    operation record left in the table, no memory lent for SEND_ZC.
    """
    yield
    loops, _uringloops[:] = list(_uringloops), []
    for loop in loops:
        assert loop.is_closed()
        stats = loop._ring.stats()
        zc = loop._ring.zerocopy_stats()
        assert stats["inflight"] == 0 and stats["records"] == 0, stats
        assert zc["pinned_buffers"] == 0 and zc["pinned_bytes"] == 0, zc


def _factories() -> dict:
    factories = {"asyncio": asyncio.SelectorEventLoop, "uringloop": _tracked_uringloop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_asyncio_loop_factories(config, item):
    return _factories()


# the set-up flags each named ring set-up needs ("plain" needs none)
SETUP_NEEDS = {
    "defer": ("SINGLE_ISSUER", "DEFER_TASKRUN"),
    "coop": ("SINGLE_ISSUER", "COOP_TASKRUN"),
}


def require_setup(setup: str) -> None:
    """Skip when this kernel (or the one URINGLOOP_EMULATE_KERNEL emulates) lacks a
    flag the named ring set-up needs."""
    flags = uringloop.probe().setup_flags
    missing = [flag for flag in SETUP_NEEDS.get(setup, ()) if not flags[flag]]
    if missing:
        pytest.skip(f"this kernel has no {' '.join(missing)}")


def open_sockets() -> set[int]:
    """Socket fds of this process (loops keep pipes and eventfds of their own)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:
            pass
    return fds


@pytest.fixture
def fd_leak_check():
    """Fail the test when it leaves sockets open."""
    gc.collect()
    before = open_sockets()
    yield
    gc.collect()
    leaked = open_sockets() - before
    assert not leaked, f"sockets leaked: {sorted(leaked)}"


CERTS = os.path.join(os.path.dirname(__file__), "certs")


def has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def tls_contexts():
    """(server, client) SSLContexts: tests/certs/keycert.pem (CN=localhost, valid until
    2126) signed by the throwaway CA in tests/certs/ca.pem."""
    import ssl

    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(os.path.join(CERTS, "keycert.pem"))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client.load_verify_locations(os.path.join(CERTS, "ca.pem"))
    return server, client


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def same(got: bytes | bytearray, want: bytes) -> bool:
    """Equality with a short message: pytest would diff megabytes byte by byte."""
    got = bytes(got)
    if got == want:
        return True
    first = next(
        (i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
        min(len(got), len(want)),
    )
    raise AssertionError(f"{len(got)} bytes, {len(want)} expected; first difference at {first}")


def log_tail(path: str, lines: int = 40) -> str:
    """The last lines of a server's log file, for a failure message."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a user would start it, in its own process group.

    ``with ServerProcess([...], ready=r"listening on (\\S+)") as server:`` waits until
    a line of its output (stdout and stderr together) matches ``ready``; on leaving it
    sends SIGINT (Ctrl+C) and waits for the whole group to exit. ``server.output`` is
    everything printed so far, for assertions and failure messages.
    """

    def __init__(self, args, *, ready, cwd=None, env=None, timeout=30.0):
        self.args, self.ready, self.cwd, self.timeout = args, ready, cwd, timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self.match = None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def __enter__(self):
        import re
        import subprocess
        import threading
        import time

        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,
        )
        seen = threading.Event()
        pattern = re.compile(self.ready)

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if self.match is None and (m := pattern.search(line)):
                    self.match = m
                    seen.set()
            seen.set()

        self.reader = threading.Thread(target=pump, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + self.timeout
        while not seen.wait(0.1):
            if time.monotonic() > deadline:
                break
        if self.match is None:
            self.stop()
            raise AssertionError(f"{self.args} did not get ready:\n{self.output}")
        return self

    def stop(self, sig=None) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig or signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # the group: workers that outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.reader.join(10)
        self.proc.stdout.close()
        return self.proc.returncode

    def __exit__(self, *exc):
        self.stop()
