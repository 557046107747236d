"""The loop's ring is restricted to what the loop uses (IORING_REGISTER_RESTRICTIONS).

The ring starts disabled; the control plane registers an allow-list of opcodes, SQE
flags and register operations (ul_restrict_ring in native/build_uring.py) before the
first wait enables it. From then on the kernel refuses anything else on that ring:
a request with another opcode completes with -EACCES, another register operation fails
with EACCES. The whole suite runs on restricted rings, which is what shows the list is
complete; these tests show that it is enforced, by the kernel, on the loop's own ring.
"""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from conftest import require_setup

import uringloop
from uringloop import _ring

IORING_REGISTER_FILES = 2  # not on the loop's list


def started_loop() -> uringloop.UringEventLoop:
    loop = uringloop.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))  # the first wait enables the ring
    return loop


async def echo_once() -> bytes:
    async def handle(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
    writer.write(b"still serving")
    got = await reader.read(100)
    writer.close()
    server.close()
    await server.wait_closed()
    return got


def bare_request(loop: uringloop.UringEventLoop, opcode: str) -> int:
    return _ring.lib.ul_submit_bare_opcode(loop._ring_setup.ring, _ring.OP[opcode])


def register_a_file(loop: uringloop.UringEventLoop) -> int:
    fds = _ring.ffi.new("int[1]", [os.open(os.devnull, os.O_RDONLY)])
    try:
        ring_fd = loop._ring_setup.ring.ring_fd
        return _ring.lib.io_uring_register(ring_fd, IORING_REGISTER_FILES, fds, 1)
    finally:
        os.close(fds[0])


@pytest.mark.parametrize("opcode", ["OPENAT", "FSYNC", "READ", "URING_CMD"])
def test_an_opcode_outside_the_list_is_refused_by_the_kernel(opcode):
    loop = started_loop()
    try:
        assert loop.ring_info()["restricted"] is True
        assert bare_request(loop, opcode) == -errno.EACCES
        assert bare_request(loop, "NOP") == 0  # on the list: runs
        assert loop.run_until_complete(echo_once()) == b"still serving"
    finally:
        loop.close()


def test_a_register_operation_outside_the_list_is_refused():
    loop = started_loop()
    try:
        assert register_a_file(loop) == -errno.EACCES
    finally:
        loop.close()


def test_unrestricted_on_request_and_the_same_requests_then_reach_the_kernel(monkeypatch):
    # the control: without the list the kernel looks at the request itself (a bare
    # OPENAT has no path: EFAULT or EBADF, never EACCES) and registers the file
    monkeypatch.setenv("URINGLOOP_RESTRICT_RING", "0")
    loop = started_loop()
    try:
        assert loop.ring_info()["restricted"] is False
        assert bare_request(loop, "OPENAT") in (-errno.EFAULT, -errno.EBADF)
        assert register_a_file(loop) == 0
        assert loop.run_until_complete(echo_once()) == b"still serving"
    finally:
        loop.close()


@pytest.mark.parametrize("setup", ["defer", "coop", "plain"])
def test_every_setup_rung_is_restricted(setup):
    require_setup(setup)
    loop = uringloop.new_event_loop(setup=setup)
    try:
        assert loop.run_until_complete(echo_once()) == b"still serving"
        assert loop.ring_info()["restricted"] is True
        assert bare_request(loop, "OPENAT") == -errno.EACCES
    finally:
        loop.close()
