"""Child of test_datagram_ring's congestion test: run in a private network namespace
whose loopback is rate-limited (tbf), so UDP sends meet a full send buffer (EAGAIN).

Prints one JSON line: how many datagrams arrived, how many out of order, the
transport's retry counters.
"""

import asyncio
import json
import socket
import struct
import sys
import threading

import uringloop

N = 400


class Quiet(asyncio.DatagramProtocol):
    pass


def main(zerocopy: str) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(3)
    got: list[int] = []

    def reader() -> None:
        try:
            while len(got) < N:
                got.append(struct.unpack("!I", rx.recv(2000)[:4])[0])
        except TimeoutError:
            pass

    thread = threading.Thread(target=reader)
    thread.start()

    async def send() -> dict:
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.connect(rx.getsockname())
        t, _ = await loop.create_datagram_endpoint(Quiet, sock=s)
        for i in range(0, N, 50):
            for j in range(i, i + 50):
                t.sendto(struct.pack("!I", j) * 300)
            await asyncio.sleep(0)
        while t.get_write_buffer_size():
            await asyncio.sleep(0.005)
        t.close()
        await asyncio.sleep(0.01)
        return loop._ring.datagram_stats()

    loop = uringloop.new_event_loop(zerocopy=zerocopy, zc_threshold=0)
    try:
        stats = loop.run_until_complete(send())
    finally:
        loop.close()
    thread.join()
    disorder = sum(1 for a, b in zip(got, got[1:], strict=False) if b < a)
    print(json.dumps({**stats, "arrived": len(got), "out_of_order": disorder}))


if __name__ == "__main__":
    main(sys.argv[1])
