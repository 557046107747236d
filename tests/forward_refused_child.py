"""Run as a child process: splice(2) fails with EINVAL (a seccomp filter), then a
loop.forward() each way between two TCP connections. The pump must find splice refused
at its first move and go on by copying, with the same result.

Prints one JSON line: the counts forward() returned, whether the bytes arrived exact,
and the loop's forward counters.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import platform
import socket
import sys

from seccomp_child import block_syscall

NR_SPLICE = {"x86_64": 275, "aarch64": 76}


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = socket.create_connection(listener.getsockname())
        side, _ = listener.accept()
    peer.setblocking(False)
    return peer, side


class Forwarded(asyncio.Protocol):
    def eof_received(self) -> bool:
        return True


async def main() -> dict:
    loop = asyncio.get_running_loop()
    a_peer, a_side = tcp_pair()
    b_peer, b_side = tcp_pair()
    a, _ = await loop.connect_accepted_socket(Forwarded, sock=a_side)
    b, _ = await loop.connect_accepted_socket(Forwarded, sock=b_side)
    there, back = os.urandom(3_000_000), os.urandom(1_000_000)

    async def send(sock: socket.socket, data: bytes) -> None:
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)

    async def receive(sock: socket.socket) -> bytes:
        parts = []
        while chunk := await loop.sock_recv(sock, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    results = await asyncio.wait_for(
        asyncio.gather(
            loop.forward(a, b),
            loop.forward(b, a),
            send(a_peer, there),
            send(b_peer, back),
            receive(b_peer),
            receive(a_peer),
        ),
        30,
    )
    for s in (a, b):
        s.close()
    for s in (a_peer, b_peer):
        s.close()
    await asyncio.sleep(0)
    stats = loop.zerocopy_stats()
    return {
        "counts": results[:2],
        "exact": results[4] == there and results[5] == back,
        "stats": {k: v for k, v in stats.items() if k.startswith("forward_")},
    }


if __name__ == "__main__":
    block_syscall(NR_SPLICE[platform.machine()], errno.EINVAL)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import uringloop

    print(json.dumps(uringloop.run(main())), flush=True)
