"""Defects the stream fuzzer (tests/fuzz_streams.py) found by itself, each pinned down.

The fuzzer finds them by chance; these tests drive each one on purpose, over real
sockets, and compare with asyncio's loop where it defines the behaviour.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

import uringloop


class EofCounter(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eofs = 0
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.eofs += 1
        if not self.eof.done():
            self.eof.set_result(None)
        return True  # keep the transport open: reading may be paused and resumed


# uringloop only: asyncio's selector loop reads the EOF again after a pause and a
# resume and calls eof_received() a second time (seen here on 3.11).
@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_pause_and_resume_after_eof_do_not_report_it_again(fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    transport, proto = await loop.connect_accepted_socket(EofCounter, a)
    b.sendall(b"last words")
    b.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(proto.eof, 5)
    for _ in range(3):
        transport.pause_reading()
        await asyncio.sleep(0.01)
        transport.resume_reading()
        await asyncio.sleep(0.01)
    assert (bytes(proto.data), proto.eofs) == (b"last words", 1)
    transport.close()
    b.close()
    await asyncio.sleep(0)


@pytest.mark.parametrize("zerocopy", ["always", "never"])
def test_close_with_unread_data_resets_at_once_while_zero_copy_memory_waits(zerocopy):
    """close() of a connection with unread received data resets it (the kernel's close()
    does), also while SEND_ZC memory still waits for its notification: the peer learns
    at once, not after the 30 s linger (the fuzzer saw both sides wait on each other)."""
    features = uringloop.probe()
    if zerocopy == "always" and not (features.send_zc and features.send_zc_report_usage):
        pytest.skip("no SEND_ZC with usage reports on this kernel: nothing is lent")

    async def main() -> tuple[bytes, str]:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        # a small receive window: what A sends stays unacknowledged, its memory lent
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        t, proto = await loop.create_connection(EofCounter, *listener.getsockname())
        peer, _ = await accepting
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        t.pause_reading()  # what the peer sends stays unread in A's socket
        await loop.sock_sendall(peer, b"unread" * 100)
        t.write(bytes(range(256)) * 1024)  # 256 KiB: SEND_ZC with zerocopy="always"
        deadline = loop.time() + 5
        while t.get_write_buffer_size():
            assert loop.time() < deadline, "the write never left the write buffer"
            await asyncio.sleep(0.005)
        if zerocopy == "always":
            assert t._stream.pinned > 0  # the scenario: memory still lent at close()
        t.close()
        got = bytearray()
        ended = "nothing"
        start = loop.time()
        try:
            while loop.time() - start < 3:
                chunk = await asyncio.wait_for(loop.sock_recv(peer, 65536), 3)
                if not chunk:
                    ended = "eof"
                    break
                got += chunk
        except ConnectionResetError:
            ended = "reset"
        except asyncio.TimeoutError:
            ended = "nothing"
        peer.close()
        listener.close()
        return bytes(got), ended

    loop = uringloop.new_event_loop(zerocopy=zerocopy, zc_threshold=4096)
    try:
        got, ended = loop.run_until_complete(main())
    finally:
        loop.close()
    # as on asyncio's loop: a reset (the kernel may hand over some data before it)
    assert ended == "reset", (len(got), ended)
    assert got == (bytes(range(256)) * 1024)[: len(got)]
