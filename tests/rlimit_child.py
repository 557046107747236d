"""Run a loop under a process-wide resource limit; started by test_resource_limits.py.

Usage: python rlimit_child.py MODE [ARGS]. Each mode prints JSON lines on stdout.

- ``nofile LOOP LIMIT [RAISE_TO]``: an echo server (create_server) on LOOP (uringloop
  or asyncio) in a process whose RLIMIT_NOFILE is LIMIT from the start (raised to
  RAISE_TO once the server listens, if given). Prints {"port", "free"} and then
  answers the lines "status" and "stop" read from stdin with a JSON line each.
- ``memlock LIMIT``: as a user of its own (no CAP_IPC_LOCK) with RLIMIT_MEMLOCK at
  LIMIT from the start, streams, datagrams and zero-copy buffers on uringloop; prints
  what went through and the loop's counters (or why there is no loop).
- ``ring-enomem``: two uringloop loops with traffic, then a seccomp filter makes
  io_uring_setup fail with ENOMEM; prints what new_event_loop(), the policy and the two
  loops did then.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import resource
import socket
import sys
import time
import warnings


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ nofile


class Echo(asyncio.Protocol):
    """Echoes, and closes its side on EOF (which frees the server's fd)."""

    connections = 0
    live: set[asyncio.Transport] = set()

    def connection_made(self, transport):
        Echo.connections += 1
        Echo.live.add(transport)
        self.transport = transport

    def connection_lost(self, exc):
        Echo.live.discard(self.transport)

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False


def nofile(loop_name: str, limit: int, raise_to: int | None = None) -> None:
    # from the start, as `ulimit -n`: io_uring reads the limit when an ACCEPT is
    # prepared, so a multishot ACCEPT armed before a change keeps the old one
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    if loop_name == "uringloop":
        import uringloop

        loop = uringloop.new_event_loop()
    else:
        loop = asyncio.SelectorEventLoop()
    records: list[dict] = []
    start = time.monotonic()

    class Keep(logging.Handler):
        def emit(self, record):
            exc = record.exc_info[1] if record.exc_info else None
            records.append(
                {
                    "t": record.created - (time.time() - time.monotonic()) - start,
                    "message": record.getMessage().splitlines()[0],
                    "errno": getattr(exc, "errno", None),
                }
            )

    logging.getLogger("asyncio").addHandler(Keep())
    server = loop.run_until_complete(loop.create_server(Echo, "127.0.0.1", 0, backlog=128))
    listen_fd = server.sockets[0].fileno()
    open_fds = len(os.listdir("/proc/self/fd")) - 1  # (less the directory's own)
    if raise_to is not None:  # raised once the server listens
        resource.setrlimit(resource.RLIMIT_NOFILE, (raise_to, hard))
        limit = raise_to
    emit({"port": server.sockets[0].getsockname()[1], "free": limit - open_fds})

    def acceptor() -> object:
        acceptors = getattr(loop, "_acceptors", None)
        if acceptors is None:
            return None
        return {"listed": listen_fd in acceptors, "key": acceptors.get(listen_fd)}

    def command() -> None:
        line = sys.stdin.readline().strip()
        if line in ("stop", ""):
            loop.remove_reader(sys.stdin.fileno())
            loop.stop()
            return
        emit(
            {
                "records": records,
                "connections": Echo.connections,
                "acceptor": acceptor(),
                "t": time.monotonic() - start,
            }
        )

    loop.add_reader(sys.stdin.fileno(), command)
    loop.run_forever()
    report: dict = {"records": records, "connections": Echo.connections, "acceptor": acceptor()}
    for transport in list(Echo.live):
        transport.close()
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.run_until_complete(asyncio.sleep(0.01))  # (connection_lost of those closed)
    loop.close()
    if loop_name == "uringloop":
        report["ring"] = loop._ring.stats()
    emit(report)


# ------------------------------------------------------------------ memlock


async def memlock_traffic() -> dict:
    loop = asyncio.get_running_loop()
    out: dict = {}

    # a registered zero-copy buffer: from the pool if any could be registered
    zbuf = loop.alloc_zerocopy_buffer(256 << 10)
    memoryview(zbuf)[:] = os.urandom(len(zbuf))
    zdata = bytes(zbuf)
    out["zerocopy_buffer_registered"] = zbuf.registered

    received = bytearray()
    done = loop.create_future()
    total = 0

    class Sink(asyncio.Protocol):
        def data_received(self, data):
            received.extend(data)
            if len(received) >= total and not done.done():
                done.set_result(None)

    payloads = [os.urandom(1 << 20), os.urandom(3 << 20), b"tail" * 1000]
    total = sum(map(len, payloads)) + len(zdata)
    server = await loop.create_server(Sink, "127.0.0.1", 0)
    transport, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname())
    transport.write(payloads[0])
    transport.write(zbuf)
    transport.write(payloads[1])
    transport.write(payloads[2])
    await asyncio.wait_for(done, 20)
    await asyncio.wait_for(zbuf.released, 20)
    want = payloads[0] + zdata + payloads[1] + payloads[2]
    out["stream_intact"] = hashlib.sha256(received).digest() == hashlib.sha256(want).digest()
    out["stream_bytes"] = len(received)
    transport.close()
    server.close()
    await server.wait_closed()

    # sock_sendzc and sock_recv
    a, b = _tcp_pair()
    with a, b:
        payload = os.urandom(2 << 20)
        got = bytearray()

        async def reader():
            while len(got) < len(payload):
                got.extend(await loop.sock_recv(b, 1 << 20))

        sent, _ = await asyncio.gather(loop.sock_sendzc(a, payload), reader())
        out["sendzc_sent"] = sent
        out["sendzc_intact"] = bytes(got) == payload

    # datagrams: a burst of small and large ones (zero-copy from 16 KiB), the last a
    # ZeroCopyBuffer
    class Collect(asyncio.DatagramProtocol):
        def __init__(self):
            self.got: list[bytes] = []
            self.waiter = loop.create_future()

        def datagram_received(self, data, addr):
            self.got.append(data)
            if len(self.got) == count and not self.waiter.done():
                self.waiter.set_result(None)

    count = 300
    sizes = [16, 1200, 30000, 60000]
    grams = [os.urandom(sizes[i % len(sizes)]) for i in range(count)]
    rsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rsock.bind(("127.0.0.1", 0))
    rt, rp = await loop.create_datagram_endpoint(Collect, sock=rsock)
    st, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=rsock.getsockname()
    )
    zgram = loop.alloc_zerocopy_buffer(20000)
    memoryview(zgram)[:] = os.urandom(len(zgram))
    grams[-1] = bytes(zgram)
    for g in grams[:-1]:
        st.sendto(g)
    st.sendto(zgram)
    await asyncio.wait_for(rp.waiter, 20)
    await asyncio.wait_for(zgram.released, 20)
    out["datagrams_in_order"] = rp.got == grams
    out["datagrams_all_there"] = sorted(rp.got) == sorted(grams)
    index = {g: i for i, g in enumerate(grams)}
    out["datagram_order"] = [index.get(g, -1) for g in rp.got]
    st.close()
    rt.close()
    await asyncio.sleep(0)

    out["ring_info"] = {
        k: v for k, v in loop.ring_info().items() if k not in ("features", "flags", "refused")
    }
    out["zerocopy_stats"] = loop.zerocopy_stats()
    out["datagram_stats"] = loop._ring.datagram_stats()
    return out


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def rings_charged_to_memlock() -> bool:
    """Whether this kernel charges the ring's own memory to RLIMIT_MEMLOCK (new
    kernels do, for users without CAP_IPC_LOCK): a ring of 1,024 SQEs (64 KiB of them)
    then cannot be had under a limit of 64 KiB."""
    from uringloop import _ring

    ring = _ring.ffi.new("struct io_uring *")
    params = _ring.ffi.new("struct io_uring_params *")
    ret = _ring.lib.io_uring_queue_init_params(1024, ring, params)
    if ret == 0:
        _ring.lib.io_uring_queue_exit(ring)
    return ret == -errno.ENOMEM


def memlock(limit: int) -> None:
    import encodings.idna  # noqa: F401  (imported on demand, unreadable by that uid)

    import uringloop

    # io_uring charges what it pins to the user (uid), not to the process: a uid of
    # its own keeps other processes' pins out of this budget. Leaving root drops
    # CAP_IPC_LOCK (the exemption from the limit) with the other capabilities.
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    uid = 0x20000 + os.getpid() % 0x10000
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    report: dict = {"memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK)[0], "uid": os.getuid()}
    errors: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    for name in ("asyncio", "uringloop"):
        logging.getLogger(name).addHandler(handler)
    try:
        loop = uringloop.new_event_loop(zerocopy="always", zc_threshold=16384)
    except uringloop.UringUnavailableError as exc:
        report["unavailable"] = {"errno": exc.errno, "message": str(exc)}
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            fallback = uringloop.EventLoopPolicy().new_event_loop()
        report["policy_loop"] = type(fallback).__name__
        fallback.close()
        time.sleep(0.2)  # (the kernel lets go of the probe's rings asynchronously)
        report["rings_charged"] = rings_charged_to_memlock()
        emit(report)
        return
    loop.set_exception_handler(lambda loop, context: errors.append(context["message"]))
    try:
        report.update(loop.run_until_complete(memlock_traffic()))
    finally:
        loop.close()
    report["errors"] = errors
    report["after_close"] = loop._ring.stats()
    report["zerocopy_after_close"] = loop._ring.zerocopy_stats()
    report["datagram_after_close"] = loop._ring.datagram_stats()
    emit(report)


# ------------------------------------------------------------------ ring-enomem


async def echo_round(rounds: int = 20) -> int:
    """Echo `rounds` messages over a fresh server and connection; the bytes echoed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
    n = 0
    for i in range(rounds):
        msg = os.urandom(1000 + i * 997)
        writer.write(msg)
        n += len(await reader.readexactly(len(msg)))
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return n


async def loop_type() -> str:
    return type(asyncio.get_running_loop()).__name__


def ring_enomem() -> None:
    from seccomp_child import block_io_uring_setup

    import uringloop

    loops = [uringloop.new_event_loop(), uringloop.new_event_loop()]
    report: dict = {"before": [loop.run_until_complete(echo_round()) for loop in loops]}

    block_io_uring_setup(errno.ENOMEM)
    try:
        uringloop.new_event_loop()
        report["new_event_loop"] = "created"
    except uringloop.UringUnavailableError as exc:
        report["new_event_loop"] = {"errno": exc.errno, "message": str(exc)}

    try:
        uringloop.run(loop_type())
        report["run"] = "ran"
    except uringloop.UringUnavailableError as exc:
        report["run"] = exc.errno

    # the loops made before the refusal go on
    report["after"] = [loop.run_until_complete(echo_round()) for loop in loops]

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("uringloop").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uringloop.install()
        report["installed_loop"] = asyncio.run(loop_type())
        report["installed_echo"] = asyncio.run(echo_round(3))
    report["warnings"] = [str(w.message) for w in caught]
    report["log_records"] = records
    try:
        uringloop.EventLoopPolicy(fallback=False).new_event_loop()
        report["fallback_false"] = "created"
    except uringloop.UringUnavailableError as exc:
        report["fallback_false"] = exc.errno

    # and close cleanly, with nothing left in the kernel
    report["closed"] = []
    for loop in loops:
        loop.close()
        report["closed"].append(loop._ring.stats())
    emit(report)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "nofile":
        nofile(sys.argv[2], *map(int, sys.argv[3:]))
    elif mode == "memlock":
        memlock(int(sys.argv[2]))
    elif mode == "ring-enomem":
        ring_enomem()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
