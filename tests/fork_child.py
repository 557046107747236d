"""Run as a child process: fork with a live uringloop loop and report what the child sees."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import uringloop


def main() -> None:
    loop = uringloop.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))  # the ring is enabled and in use
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        report = {}
        try:
            loop.run_until_complete(asyncio.sleep(0))
            report["parent_loop"] = "ran"
        except RuntimeError as exc:
            report["parent_loop"] = str(exc)
        fresh = uringloop.new_event_loop()
        try:
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            fresh.run_until_complete(fresh.sock_sendall(a, b"child"))
            report["fresh_loop"] = fresh.run_until_complete(fresh.sock_recv(b, 10)).decode()
        finally:
            fresh.close()
        loop.close()  # must not touch the parent's requests
        report["parent_loop_closed"] = loop.is_closed()
        os.write(w, json.dumps(report).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    _, status = os.waitpid(pid, 0)
    # the parent's loop still works after the child used and closed its copy
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    loop.run_until_complete(loop.sock_sendall(a, b"parent"))
    parent_after = loop.run_until_complete(loop.sock_recv(b, 10)).decode()
    loop.close()
    print(
        json.dumps({"child": json.loads(data or b"{}"), "status": status, "parent": parent_after})
    )


if __name__ == "__main__":
    sys.exit(main())
