"""Run zero-copy sends under a small RLIMIT_MEMLOCK, as an unprivileged user would.

Started by test_zerocopy_buffers.py in its own process: it drops CAP_IPC_LOCK (root is
exempt from the limit otherwise), lowers RLIMIT_MEMLOCK to LIMIT, sends large writes with
zerocopy="always" and prints one JSON line of what happened.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import resource
import socket
import sys

CAP_IPC_LOCK = 14
SYS_CAPGET, SYS_CAPSET = 125, 126  # x86_64
LIMIT = 1 << 20


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_ipc_lock() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if libc.syscall(SYS_CAPGET, ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for d in data:
        d.effective &= ~(1 << CAP_IPC_LOCK)
        d.permitted &= ~(1 << CAP_IPC_LOCK)
    if libc.syscall(SYS_CAPSET, ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


async def main() -> dict:
    loop = asyncio.get_running_loop()
    buf = loop.alloc_zerocopy_buffer(4096)  # makes the pool, halved until it fits

    received = bytearray()
    done = loop.create_future()

    class Sink(asyncio.Protocol):
        def data_received(self, data):
            received.extend(data)
            if len(received) >= total:
                done.set_result(None)

    payloads = [bytes([i]) * (1 << 20) for i in range(4)]
    total = sum(map(len, payloads))
    server = await loop.create_server(Sink, "127.0.0.1", 0)
    transport, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname())
    for p in payloads:
        transport.write(p)
    await asyncio.wait_for(done, 30)
    intact = hashlib.sha256(received).digest() == hashlib.sha256(b"".join(payloads)).digest()
    transport.close()
    server.close()
    await server.wait_closed()

    # 2 MiB of SEND_ZC is more than the memlock limit lets the kernel pin
    srv = socket.create_server(("127.0.0.1", 0))
    with srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
    with c, s:
        c.setblocking(False)
        s.setblocking(False)
        payload = bytes(range(256)) * (8 << 10)
        got = bytearray()

        async def reader():
            while len(got) < len(payload):
                got.extend(await loop.sock_recv(s, 1 << 20))

        sent, _ = await asyncio.gather(loop.sock_sendzc(c, payload), reader())
    stats = loop.zerocopy_stats()
    return {
        "pool_bytes": stats["registered_pool_bytes"],
        "buffer_registered": buf.registered,
        "transport_intact": intact,
        "sendzc_sent": sent,
        "sendzc_intact": bytes(got) == payload,
        "stats": stats,
    }


if __name__ == "__main__":
    drop_ipc_lock()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LIMIT, LIMIT))
    import uringloop

    loop = uringloop.UringEventLoop(zerocopy="always", zc_threshold=65536)
    try:
        result = loop.run_until_complete(main())
    finally:
        loop.close()
    print(json.dumps(result))
    sys.exit(0)
