"""loop.sendfile() and loop.sock_sendfile(): the bytes, the file position, the errors.

On uringloop a regular file goes to the socket with IORING_OP_SPLICE through a pipe;
the uringloop-only tests check that its data never passed through user space.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import tempfile

import pytest
from conftest import same

DATA = os.urandom(3 * 1024 * 1024 + 4321)
# uvloop has no sendfile/sock_sendfile (AbstractEventLoop's NotImplementedError)
ASYNCIO_AND_URINGLOOP = ["asyncio", "uringloop"]


@pytest.fixture
def datafile():
    with tempfile.TemporaryFile() as f:
        f.write(DATA)
        f.flush()
        f.seek(0)
        yield f


class Collect(asyncio.Protocol):
    def __init__(self, close_after: int = 0) -> None:
        self.data = bytearray()
        self.close_after = close_after
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if self.close_after and len(self.data) >= self.close_after:
            self.transport.abort()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(None)


async def connected_pair(close_after: int = 0):
    """(server protocol, client transport, server) over loopback TCP."""
    loop = asyncio.get_running_loop()
    receiver = None

    def factory():
        nonlocal receiver
        receiver = Collect(close_after)
        return receiver

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    while receiver is None:
        await asyncio.sleep(0)
    return receiver, transport, server


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_sendfile_over_transport_keeps_order_and_file_position(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair()
    transport.write(b"HEAD")
    sent = await loop.sendfile(transport, datafile, 1000, 2_000_000)
    transport.write(b"TAIL")
    transport.close()
    await asyncio.wait_for(receiver.done, 20)
    server.close()
    await server.wait_closed()
    assert sent == 2_000_000
    assert datafile.tell() == 1000 + 2_000_000
    assert same(receiver.data, b"HEAD" + DATA[1000:2_001_000] + b"TAIL")


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_sendfile_to_the_end_of_the_file(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair()
    sent = await loop.sendfile(transport, datafile, 5)
    transport.close()
    await asyncio.wait_for(receiver.done, 20)
    server.close()
    await server.wait_closed()
    assert sent == len(DATA) - 5
    assert same(receiver.data, DATA[5:])
    assert datafile.tell() == len(DATA)


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_write_during_sendfile_raises(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair()
    task = asyncio.ensure_future(loop.sendfile(transport, datafile))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        transport.write(b"x")
    assert await task == len(DATA)
    transport.write(b"after")
    transport.close()
    await asyncio.wait_for(receiver.done, 20)
    server.close()
    await server.wait_closed()
    assert same(receiver.data, DATA + b"after")


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_sendfile_peer_closes_in_the_middle(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair(close_after=64 * 1024)
    transport.set_write_buffer_limits(0)
    with pytest.raises(ConnectionError):
        # a few rounds: the socket buffers of loopback can swallow a whole file
        for _ in range(20):
            datafile.seek(0)
            await loop.sendfile(transport, datafile)
    await asyncio.wait_for(receiver.done, 20)
    transport.close()
    server.close()
    await server.wait_closed()
    assert 0 < datafile.tell() <= len(DATA)


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_sendfile_of_a_non_file_falls_back(fd_leak_check):
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair()
    buf = io.BytesIO(DATA[:100_000])
    assert await loop.sendfile(transport, buf) == 100_000
    with pytest.raises(asyncio.SendfileNotAvailableError):
        await loop.sendfile(transport, io.BytesIO(b"abc"), fallback=False)
    transport.close()
    await asyncio.wait_for(receiver.done, 20)
    server.close()
    await server.wait_closed()
    assert same(receiver.data, DATA[:100_000])


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_sendfile_bad_arguments_raise_like_asyncio(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair()
    with pytest.raises(ValueError):
        await loop.sendfile(transport, datafile, -1)
    with pytest.raises(ValueError):
        await loop.sendfile(transport, datafile, 0, 0)
    with pytest.raises(TypeError):
        await loop.sendfile(transport, datafile, "0")
    transport.close()
    with pytest.raises(RuntimeError):
        await loop.sendfile(transport, datafile)
    await asyncio.wait_for(receiver.done, 20)
    server.close()
    await server.wait_closed()


async def sock_pair():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    a = socket.socket()
    a.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(a, lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    b.setblocking(False)
    return a, b


async def recv_until_eof(sock) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        out += chunk
    return bytes(out)


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_sock_sendfile_with_offset_and_count(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = await sock_pair()
    with a, b:
        reader = asyncio.ensure_future(recv_until_eof(b))
        sent = await loop.sock_sendfile(a, datafile, 7, 1_500_000)
        a.shutdown(socket.SHUT_WR)
        got = await asyncio.wait_for(reader, 20)
    assert sent == 1_500_000
    assert same(got, DATA[7:1_500_007])
    assert datafile.tell() == 1_500_007


@pytest.mark.asyncio(loop_factories=ASYNCIO_AND_URINGLOOP)
async def test_sock_sendfile_rejects_what_asyncio_rejects(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = await sock_pair()
    with a, b:
        with pytest.raises(ValueError):
            await loop.sock_sendfile(a, datafile, -5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            with pytest.raises(ValueError):
                await loop.sock_sendfile(udp, datafile)
        with open(datafile.fileno(), closefd=False) as text:
            with pytest.raises(ValueError):
                await loop.sock_sendfile(a, text)


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_uringloop_sendfile_splices_without_reading_the_file(datafile, fd_leak_check):
    """The file's bytes never pass through read(): /proc/self/io counts every byte
    read() and sendfile() hand over, and splice counts none."""
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair()
    before_stats = loop.zerocopy_stats()
    before = rchar()
    sent = await loop.sendfile(transport, datafile)
    read_meanwhile = rchar() - before
    stats = loop.zerocopy_stats()
    transport.close()
    await asyncio.wait_for(receiver.done, 20)
    server.close()
    await server.wait_closed()
    assert same(receiver.data, DATA)
    assert sent == len(DATA)
    assert read_meanwhile < len(DATA) // 16, read_meanwhile
    assert stats["sendfile_spliced_bytes"] - before_stats["sendfile_spliced_bytes"] == len(DATA)


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_uringloop_rchar_sees_a_read_fallback(fd_leak_check):
    """The check above can fail: a fallback that reads the file shows in rchar."""
    loop = asyncio.get_running_loop()
    receiver, transport, server = await connected_pair()
    with tempfile.TemporaryFile() as f:
        f.write(DATA)
        f.seek(0)
        before = rchar()
        await loop._sendfile_fallback(transport, f, 0, None)
        assert rchar() - before >= len(DATA)
    transport.close()
    await asyncio.wait_for(receiver.done, 20)
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio(loop_factories=["uringloop"])
async def test_uringloop_cancelled_sendfile_leaves_nothing_behind(datafile, fd_leak_check):
    loop = asyncio.get_running_loop()
    a, b = await sock_pair()
    with a, b:
        fds_before = len(os.listdir("/proc/self/fd"))
        task = asyncio.ensure_future(loop.sock_sendfile(a, datafile))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the peer reads nothing: the socket buffer stays full, the splice was cut short
        position = datafile.tell()
        assert 0 <= position < len(DATA)
        await asyncio.sleep(1.2)  # pipes of cancelled splices close after a delay
        assert len(os.listdir("/proc/self/fd")) <= fds_before
