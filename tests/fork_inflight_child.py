"""Run as a child process: fork while the parent's ring has requests prepared and in flight.

The SQ, the SQE array and the CQ are memory shared with the kernel, and a forked
child inherits that mapping: one SQE the child writes lands in the slot the parent
fills next. So the parent forks from a callback, prepares requests right after the
fork (an abort() prepares cancels), and only then lets the child loose on the
inherited transports and loop. The child must get clear errors (or inert no-ops) and
never touch the ring; the parent must carry on as if nothing happened:

- A: the parent aborts it after the fork; its peer must see the connection go (the
  abort's cancels reached the kernel, so the socket file is released);
- B: busy both ways throughout; every byte arrives;
- C: paused by the parent before the fork, its peer keeps sending; after resuming,
  every byte arrives (no request of the child's stole it);
- no completion arrives that the parent's ring does not know (stray CQEs).

Prints one JSON line: {"child": {...}, "status": ..., "parent": {...}}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys

import uringloop


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data.extend(data)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


def child_actions(loop, transports) -> dict:
    """Everything a careless child might do with what it inherited."""
    report: dict[str, str] = {}
    for name, t in transports.items():
        for action in ("resume_reading", "pause_reading", "write", "write_eof", "close", "abort"):
            try:
                if action == "write":
                    t.write(b"child was here")
                else:
                    getattr(t, action)()
                report[f"{name}.{action}"] = "ok"
            except RuntimeError as exc:
                report[f"{name}.{action}"] = f"RuntimeError: {exc}"
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        # the loop is "running" in the child (it forked from a callback): drive the
        # coroutine by hand to reach the ring
        coro = loop.sock_recv(a, 10)
        try:
            coro.send(None)
            report["sock_recv"] = "submitted"
        except RuntimeError as exc:
            report["sock_recv"] = f"RuntimeError: {exc}"
        finally:
            coro.close()
    finally:
        a.close()
        b.close()
    return report


async def main(loop) -> dict:
    protos: list[Sink] = []

    def factory():
        protos.append(Sink())
        return protos[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    addr = server.sockets[0].getsockname()
    clients = []
    for _ in range(3):
        _, client = await loop.create_connection(Sink, *addr)
        clients.append(client)
    while len(protos) < 3 or any(p.transport is None for p in protos):
        await asyncio.sleep(0.001)
    a_srv, b_srv, c_srv = protos
    a_cli, b_cli, c_cli = clients
    c_srv.transport.pause_reading()
    for t in (b_cli.transport, b_srv.transport):
        t.write(b"before fork " * 1000)
    await asyncio.sleep(0.01)

    forked = loop.create_future()

    def fork_now():
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(done_r)
            os.read(go_r, 1)  # until the parent has prepared its requests
            try:
                report = child_actions(
                    loop,
                    {  # C first: its resume_reading() would arm a receive
                        "C": c_srv.transport,
                        "B": b_srv.transport,
                        "Bc": b_cli.transport,
                        "A": a_srv.transport,
                    },
                )
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                report = {"unexpected": repr(exc)}
            os.write(done_w, json.dumps(report).encode())
            os._exit(0)
        os.close(go_r)
        os.close(done_w)
        # requests prepared after the fork and not yet submitted: the child's SQEs
        # would land exactly here
        a_srv.transport.abort()
        b_srv.transport.write(b"x" * 70_000)
        os.write(go_w, b"!")
        raw = b""
        while chunk := os.read(done_r, 65536):
            raw += chunk
        os.close(go_w)
        os.close(done_r)
        _, status = os.waitpid(pid, 0)
        forked.set_result((json.loads(raw or b"{}"), status))

    loop.call_soon(fork_now)
    child, status = await forked

    # the parent carries on
    payload = os.urandom(3 << 20)
    c_cli.transport.write(payload)
    b_cli.transport.write(payload)
    b_srv.transport.write(payload)
    await asyncio.sleep(0.05)
    c_srv.transport.resume_reading()
    parent: dict[str, object] = {}
    try:
        await asyncio.wait_for(a_cli.lost, 5)
        parent["A_peer_saw_the_abort"] = True
    except asyncio.TimeoutError:
        parent["A_peer_saw_the_abort"] = False
    want = len(payload)
    deadline = loop.time() + 20
    while len(c_srv.data) < want or len(b_srv.data) < 12_000 + want:
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    while len(b_cli.data) < 12_000 + 70_000 + want and loop.time() < deadline:
        await asyncio.sleep(0.01)
    digest = hashlib.sha256(payload).hexdigest()
    parent["C_intact"] = hashlib.sha256(c_srv.data).hexdigest() == digest
    parent["B_to_server_intact"] = (
        bytes(b_srv.data[:12_000]) == b"before fork " * 1000
        and hashlib.sha256(b_srv.data[12_000:]).hexdigest() == digest
    )
    parent["B_to_client_intact"] = (
        bytes(b_cli.data[:12_000]) == b"before fork " * 1000
        and bytes(b_cli.data[12_000:82_000]) == b"x" * 70_000
        and hashlib.sha256(b_cli.data[82_000:]).hexdigest() == digest
    )
    parent["stray_cqes"] = loop.ring_info()["stray_cqes"]
    for p in (*protos[1:], *clients):
        p.transport.close()
    lost = asyncio.gather(*(p.lost for p in (*protos[1:], *clients)), return_exceptions=True)
    try:
        await asyncio.wait_for(asyncio.shield(lost), 10)
        parent["closed_cleanly"] = True
    except asyncio.TimeoutError:
        parent["closed_cleanly"] = False
    server.close()
    await server.wait_closed()
    return {"child": child, "status": status, "parent": parent}


if __name__ == "__main__":
    loop = uringloop.new_event_loop()
    try:
        result = loop.run_until_complete(main(loop))
    finally:
        loop.close()
    print(json.dumps(result))
    sys.exit(0)
