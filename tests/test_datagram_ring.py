"""The native datagram transport's own machinery, on uringloop only, over real sockets.

How datagrams meet the ring (multishot RECVMSG or single-shot, batched SENDMSG,
SENDMSG_ZC, retries after EAGAIN, the end of the loop with datagrams in flight);
test_datagram.py holds the behaviour every loop shares.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest

import uringloop
from uringloop._datagram import RingDatagramTransport

needs_zc = pytest.mark.skipif(
    not uringloop.probe().send_zc_report_usage, reason="this kernel has no SEND_ZC usage reports"
)


def run(coro, **options):
    loop = uringloop.new_event_loop(**options)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
        assert loop._ring.closed


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, object]] = []
        self.errors: list[BaseException] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.event = asyncio.Event()
        self.want = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.got.append((data, addr))
        if len(self.got) >= self.want:
            self.event.set()

    def error_received(self, exc):
        self.errors.append(exc)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        self.want = n
        if len(self.got) >= n:
            return
        self.event.clear()
        await asyncio.wait_for(self.event.wait(), timeout)


async def udp_pair(**client_kwargs):
    loop = asyncio.get_running_loop()
    server, sproto = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
    client, cproto = await loop.create_datagram_endpoint(
        Collect, remote_addr=server.get_extra_info("sockname"), **client_kwargs
    )
    return server, sproto, client, cproto


def test_udp_uses_the_native_transport_with_a_multishot_receive():
    async def main():
        server, sproto, client, cproto = await udp_pair()
        assert isinstance(server, RingDatagramTransport)
        await asyncio.sleep(0)
        assert server._dgram.receiving
        assert server._dgram.multishot == asyncio.get_running_loop()._ring.recv_multishot
        client.sendto(b"ping")
        await sproto.wait_for(1)
        assert sproto.got == [(b"ping", client.get_extra_info("sockname"))]
        client.close()
        server.close()
        assert await sproto.lost is None

    run(main())


def test_unix_datagrams_use_single_shot_receives_of_asyncio_size(tmp_path):
    # Unix datagrams may exceed the 64 KiB ring buffers: 256 KiB single-shot receives
    async def main():
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "d.sock")
        server, sproto = await loop.create_datagram_endpoint(
            Collect, local_addr=path, family=socket.AF_UNIX
        )
        await asyncio.sleep(0)
        assert server._dgram.receiving and not server._dgram.multishot
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        big = bytes(range(256)) * 800  # 200 KiB: more than a ring buffer holds
        sender.sendto(big, path)
        await sproto.wait_for(1)
        assert sproto.got[0] == (big, None)  # an unbound sender has no address
        sender.close()
        server.close()

    run(main())


def test_sendto_many_keeps_order_and_counts_bytes_until_sent():
    async def main():
        server, sproto, client, cproto = await udp_pair()
        sent = 0
        for burst in range(20):
            pairs = [(struct.pack("!I", burst * 100 + i) * (1 + i % 50), None) for i in range(100)]
            uringloop.sendto_many(client, pairs)
            size = sum(len(p) for p, _ in pairs)
            assert client.get_write_buffer_size() == size  # queued until the iteration ends
            sent += len(pairs)
            await sproto.wait_for(sent)
            assert client.get_write_buffer_size() == 0
        seq = [struct.unpack("!I", d[:4])[0] for d, _ in sproto.got]
        assert seq == list(range(2000))
        client.close()
        server.close()

    run(main())


def test_sendto_many_rejects_a_bad_pair_after_queueing_the_good_ones():
    async def main():
        server, sproto, client, cproto = await udp_pair()
        with pytest.raises(TypeError):
            client.sendto_many([(b"a", None), (b"b", None), "not a pair", (b"c", None)])
        with pytest.raises(TypeError, match="bytes-like"):
            client.sendto_many([(b"d", None), ("text", None)])
        await sproto.wait_for(3)
        assert [d for d, _ in sproto.got] == [b"a", b"b", b"d"]
        client.close()
        server.close()

    run(main())


def test_sends_that_find_no_room_go_again_in_order(tmp_path):
    # A Unix datagram sender may queue only a few datagrams at its peer (max_dgram_qlen)
    # before sends fail with EAGAIN: those are resent after POLLOUT, in their order.
    async def main():
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "r.sock")
        receiver, rproto = await loop.create_datagram_endpoint(
            Collect, local_addr=path, family=socket.AF_UNIX
        )
        sender, _ = await loop.create_datagram_endpoint(
            Collect, remote_addr=path, family=socket.AF_UNIX
        )
        n = 600
        sender.sendto_many([(struct.pack("!I", i) * 64, None) for i in range(n)])
        await rproto.wait_for(n, timeout=20)
        seq = [struct.unpack("!I", d[:4])[0] for d, _ in rproto.got]
        assert seq == list(range(n))
        assert loop._ring.datagram_stats()["send_retries"] > 0
        assert sender.get_write_buffer_size() == 0
        sender.close()
        receiver.close()

    run(main())


@needs_zc
def test_large_datagrams_go_zero_copy_and_arrive_intact():
    async def main():
        loop = asyncio.get_running_loop()
        server, sproto, client, cproto = await udp_pair()
        # (few enough for the receiver's socket buffer: loopback drops the rest)
        payloads = [bytes([i]) * 60000 for i in range(2)]
        zbuf = loop.alloc_zerocopy_buffer(30000)
        memoryview(zbuf)[:] = b"z" * 30000
        for p in payloads:
            client.sendto(p)
        client.sendto(zbuf)
        await sproto.wait_for(3)
        assert [d for d, _ in sproto.got] == payloads + [b"z" * 30000]
        assert loop._ring.datagram_stats()["zc_sends"] == 3
        for _ in range(100):  # the notifications follow the sends
            if client._dgram.pinned == 0:
                break
            await asyncio.sleep(0.01)
        assert client._dgram.pinned == 0
        assert client.get_write_buffer_size() == 0
        client.close()
        server.close()

    run(main(), zerocopy="always", zc_threshold=16384)


def test_close_sends_what_is_queued_and_abort_drops_it():
    async def main():
        server, sproto, client, cproto = await udp_pair()
        for i in range(10):
            client.sendto(b"%d" % i)
        client.close()
        assert client.is_closing()
        assert not cproto.lost.done()
        assert await cproto.lost is None
        await sproto.wait_for(10)
        assert [d for d, _ in sproto.got] == [b"%d" % i for i in range(10)]
        server2, _, client2, cproto2 = await udp_pair()
        for _ in range(10):
            client2.sendto(b"lost")
        client2.abort()
        assert client2.get_write_buffer_size() == 0
        assert await cproto2.lost is None
        client2.sendto(b"after")  # counted, dropped: no error
        await asyncio.sleep(0.05)
        server.close()
        server2.close()

    run(main())


def test_datagram_received_that_closes_stops_delivery_at_once():
    async def main():
        loop = asyncio.get_running_loop()

        class CloseOnFirst(Collect):
            def datagram_received(self, data, addr):
                super().datagram_received(data, addr)
                self.transport.close()

        server, sproto = await loop.create_datagram_endpoint(
            CloseOnFirst, local_addr=("127.0.0.1", 0)
        )
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(20):  # all in the socket before the loop looks
            sender.sendto(b"%d" % i, server.get_extra_info("sockname"))
        assert await sproto.lost is None
        assert [d for d, _ in sproto.got] == [b"0"]
        sender.close()

    run(main())


def test_pause_reading_holds_datagrams_and_resume_delivers_them_in_order():
    async def main():
        loop = asyncio.get_running_loop()

        class PauseOnFirst(Collect):
            def datagram_received(self, data, addr):
                super().datagram_received(data, addr)
                if len(self.got) == 1:
                    self.transport.pause_reading()

        server, sproto = await loop.create_datagram_endpoint(
            PauseOnFirst, local_addr=("127.0.0.1", 0)
        )
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(30):
            sender.sendto(b"%d" % i, server.get_extra_info("sockname"))
        await sproto.wait_for(1)
        await asyncio.sleep(0.05)
        assert [d for d, _ in sproto.got] == [b"0"]
        assert not server.is_reading()
        server.resume_reading()
        await sproto.wait_for(30)
        assert [d for d, _ in sproto.got] == [b"%d" % i for i in range(30)]
        sender.close()
        server.close()

    run(main())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_loop_close_with_datagrams_queued_and_in_flight():
    # the transports are left open on purpose: loop.close() must cope with them
    loop = uringloop.new_event_loop(zerocopy="always")

    async def main():
        server, sproto, client, cproto = await udp_pair()
        for _ in range(50):
            client.sendto(bytes(65000))
        return server, client

    server, client = loop.run_until_complete(main())
    # the iteration that would submit them never comes
    loop.close()
    assert loop._ring.closed
    assert loop._ring.stats()["records"] == 0
    del server, client
    gc.collect()


def test_sendto_checks_as_asyncio_does():
    async def main():
        loop = asyncio.get_running_loop()
        server, sproto, client, cproto = await udp_pair()
        with pytest.raises(TypeError, match="bytes-like object, not 'str'"):
            client.sendto("text")
        with pytest.raises(ValueError, match="Invalid address"):
            client.sendto(b"x", ("127.0.0.1", 9))
        client.sendto(b"same", server.get_extra_info("sockname"))  # the connected address
        await sproto.wait_for(1)
        # unconnected: host names resolve as socket.sendto() resolves them
        plain, pproto = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
        plain.sendto(b"named", ("localhost", server.get_extra_info("sockname")[1]))
        plain.sendto(bytearray(b"mutable"), server.get_extra_info("sockname"))
        await sproto.wait_for(3)
        assert [d for d, _ in sproto.got] == [b"same", b"named", b"mutable"]
        # a missing address on an unconnected transport is fatal, as on asyncio's loop
        errors = []
        loop.set_exception_handler(lambda loop, ctx: errors.append(ctx))
        plain.sendto(b"nowhere")
        assert isinstance(await pproto.lost, TypeError)
        assert errors and errors[0]["message"] == "Fatal write error on datagram transport"
        # an OSError of the address goes to error_received
        plain2, pproto2 = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
        plain2.sendto(b"x", ("no-such-host.invalid", 9))
        assert pproto2.errors and isinstance(pproto2.errors[0], OSError)
        for t in (client, server, plain2):
            t.close()

    run(main())


def test_a_cancelled_sock_recvfrom_hands_its_datagram_to_the_next_receive():
    # The datagram arrives while the RECVMSG is in the kernel and the task is cancelled
    # before the loop reaps it: whichever wins (the cancel or the receive), the datagram
    # reaches the next sock_recvfrom exactly once.
    async def main():
        loop = asyncio.get_running_loop()
        kept = []
        keep = loop._keep_orphaned_data

        def counting_keep(sock, data, key):
            if isinstance(data, tuple):
                kept.append(data)
            keep(sock, data, key)

        loop._keep_orphaned_data = counting_keep
        loop._ring.orphan_callback = counting_keep
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        a.setblocking(False)
        b.setblocking(False)
        got = []
        for i in range(100):
            task = asyncio.ensure_future(loop.sock_recvfrom(a, 100))
            await asyncio.sleep(0)  # the RECVMSG is in the kernel now
            b.sendto(b"%d" % i, a.getsockname())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            data, addr = await asyncio.wait_for(loop.sock_recvfrom(a, 100), 5)
            assert addr == b.getsockname()
            got.append(int(data))
        assert got == list(range(100))
        assert kept, "no cancelled receive took a datagram: the test did not reach the path"
        a.close()
        b.close()

    run(main())


def test_unix_datagrams_keep_their_order_while_the_peer_reads_concurrently(tmp_path):
    # a reader in another thread frees room between two sends: a batch of MSG_DONTWAIT
    # requests would let a later datagram overtake a refused one; Unix sockets send in
    # order with sendmsg() and wait for POLLOUT on the ring
    import threading
    import time

    n = 2000
    path = str(tmp_path / "r.sock")
    rs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rs.bind(path)
    rs.settimeout(5)
    out: list[int] = []

    def reader():
        try:
            while len(out) < n:
                out.append(struct.unpack("!I", rs.recv(1024)[:4])[0])
                if len(out) % 7 == 0:
                    time.sleep(0)
        except OSError:
            pass

    thread = threading.Thread(target=reader)
    thread.start()

    async def main():
        loop = asyncio.get_running_loop()
        t, _ = await loop.create_datagram_endpoint(Collect, remote_addr=path, family=socket.AF_UNIX)
        for i in range(0, n, 100):
            for j in range(i, i + 100):
                t.sendto(struct.pack("!I", j) * 16)
            await asyncio.sleep(0)
        while t.get_write_buffer_size():
            await asyncio.sleep(0.001)
        t.close()
        return loop._ring.datagram_stats()["send_retries"]

    retries = run(main())
    thread.join()
    rs.close()
    assert out == list(range(n))
    assert retries > 0  # the peer's queue did fill up


def test_sendto_takes_addr_by_keyword_and_sendto_many_keeps_its_error():
    async def main():
        loop = asyncio.get_running_loop()
        server, sproto, client, cproto = await udp_pair()
        plain, _ = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
        plain.sendto(b"kw", addr=server.get_extra_info("sockname"))
        plain.sendto(data=b"kw2", addr=server.get_extra_info("sockname"))
        with pytest.raises(TypeError):
            plain.sendto(b"x", ("127.0.0.1", 1), 3)
        with pytest.raises(TypeError):
            plain.sendto(b"x", address=("127.0.0.1", 1))
        await sproto.wait_for(2)
        assert [d for d, _ in sproto.got] == [b"kw", b"kw2"]
        # a bad pair after good ones: pause_writing() for what was queued, then the error
        paused = []
        cproto.pause_writing = lambda: paused.append(True)
        client.set_write_buffer_limits(high=1, low=0)
        with pytest.raises(TypeError, match="pairs"):
            client.sendto_many([(b"aa", None), (b"bb", None), "not a pair"])
        assert paused == [True]
        for t in (client, server, plain):
            t.close()

    run(main())


def test_a_protocol_without_error_received_still_gets_datagrams():
    class Duck:
        def __init__(self):
            self.got = []

        def connection_made(self, t):
            self.t = t

        def datagram_received(self, data, addr):
            self.got.append(data)

        def connection_lost(self, exc):
            pass

    async def main():
        loop = asyncio.get_running_loop()
        handled = []
        loop.set_exception_handler(lambda lp, ctx: handled.append(ctx.get("exception")))
        server, duck = await loop.create_datagram_endpoint(Duck, local_addr=("127.0.0.1", 0))
        bare, _ = await loop.create_datagram_endpoint(
            asyncio.BaseProtocol, local_addr=("127.0.0.1", 0)
        )
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(3):
            sender.sendto(b"%d" % i, server.get_extra_info("sockname"))
            sender.sendto(b"%d" % i, bare.get_extra_info("sockname"))
        for _ in range(100):
            if len(duck.got) == 3 and len(handled) == 3:
                break
            await asyncio.sleep(0.01)
        assert duck.got == [b"0", b"1", b"2"]
        # as on asyncio's loop: each datagram's missing datagram_received is reported
        assert len(handled) == 3 and all(isinstance(e, AttributeError) for e in handled)
        sender.close()
        server.close()
        bare.close()

    run(main())


def test_a_sendto_in_the_last_iteration_before_stop_still_goes_out():
    # asyncio sends inside sendto(); here the loop's stop flushes what the last
    # iteration queued (datagrams and stream writes alike)
    loop = uringloop.new_event_loop()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)

    async def main():
        t, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Collect, remote_addr=peer.getsockname()
        )
        return t

    transport = loop.run_until_complete(main())
    loop.call_soon(transport.sendto, b"last words")
    loop.call_soon(loop.stop)
    loop.run_forever()
    try:
        assert peer.recv(100) == b"last words"
    finally:
        transport.abort()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        peer.close()


def test_an_address_whose_port_closes_the_transport_queues_nothing():
    class Port:
        def __init__(self, port, transport):
            self.port, self.transport = port, transport

        def __index__(self):
            self.transport.abort()
            return self.port

    async def main():
        loop = asyncio.get_running_loop()
        server, sproto = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
        client, cproto = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
        await asyncio.sleep(0)
        records = loop._ring.stats()["records"]
        host, port = server.get_extra_info("sockname")
        client.sendto(b"x" * 1000, (host, Port(port, client)))
        assert client.get_write_buffer_size() == 0
        assert await cproto.lost is None
        assert loop._ring.stats()["records"] <= records
        await asyncio.sleep(0.05)
        assert sproto.got == []
        server.close()

    run(main())


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("unshare"),
    reason="needs root, tc and unshare for a rate-limited private loopback",
)
@pytest.mark.parametrize("zerocopy", ["never", "always"])
def test_udp_sends_on_a_congested_socket_keep_order_and_retry_only_the_head(zerocopy):
    # behind a 20 Mbit/s loopback with a 4 KiB send buffer most sends find no room:
    # every datagram still arrives in sendto() order, and each POLLOUT resubmits what
    # fits the buffer, not the whole rest of the queue (which grew quadratically)
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "udp_congestion_child.py")
    script = (
        "ip link set lo up && tc qdisc add dev lo root tbf rate 20mbit burst 20kb "
        'latency 200ms && exec "$@"'
    )
    out = subprocess.run(
        ["unshare", "-n", "sh", "-c", script, "sh", sys.executable, child, zerocopy],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["arrived"] == 400
    # (the batch that first meets the full buffer may let a datagram behind a refused one
    # through when room frees up meanwhile: datagram.c's one exception, seen once on CI;
    # without the congestion sizing 15-28 of 400 arrived out of order)
    assert result["out_of_order"] <= 3, result
    assert 0 < result["send_retries"] < 400


def test_source_addresses_stay_right_across_many_peers_and_replies_reach_them():
    # the per-ring table of address tuples (256 slots) is overrun by 300 peers, and
    # replies to the tuple just received take the remembered address: every peer must
    # see its own datagram come back, and each address seen must be its sender's
    async def main():
        loop = asyncio.get_running_loop()

        class Echo(Collect):
            def datagram_received(self, data, addr):
                super().datagram_received(data, addr)
                self.transport.sendto(data, addr)

        server, sproto = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        peers = []
        for _ in range(300):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            peers.append(s)
        for rounds in range(2):
            for i, s in enumerate(peers):
                s.sendto(b"%d" % i, server.get_extra_info("sockname"))
                if i % 50 == 49:
                    await sproto.wait_for(rounds * 300 + i + 1)
            await sproto.wait_for((rounds + 1) * 300)
        for data, addr in sproto.got:
            assert addr == peers[int(data)].getsockname()
        for i, s in enumerate(peers):
            replies = []
            for _ in range(200):
                try:
                    replies.append(s.recv(100))
                except BlockingIOError:
                    if len(replies) == 2:
                        break
                    await asyncio.sleep(0.005)
            assert replies == [b"%d" % i] * 2
            s.close()
        # an equal tuple that is not the one received is parsed, and goes there too
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        plain.bind(("127.0.0.1", 0))
        plain.setblocking(False)
        host, port = plain.getsockname()
        server.sendto(b"parsed", (str(host), int(port)))
        assert await asyncio.wait_for(loop.sock_recv(plain, 100), 5) == b"parsed"
        plain.close()
        server.close()

    run(main())
