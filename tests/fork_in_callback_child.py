"""Run as a child process: fork from inside data_received(), called by the native reap.

The child returns from the callback into the middle of the parent's completion batch,
whose CQ ring is shared memory (and not even mapped in the child: MADV_DONTFORK). It
must stop there with RuntimeError, read no further CQE, advance nothing, deliver
nothing more; the parent must carry on: its next bytes arrive.

    python fork_in_callback_child.py multishot|single-shot

Prints one JSON line: {"child_exit": ..., "child_signal": ..., "after_fork": ...}.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import uringloop

CHILD_RAISED_RUNTIME_ERROR = 3
CHILD_FINISHED_THE_LOOP = 4
CHILD_OTHER_ERROR = 5


class ForkingProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.forked = asyncio.get_running_loop().create_future()
        self.more = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if not self.forked.done():
            pid = os.fork()
            if pid == 0:
                return  # the child goes back into the native dispatch
            _, status = os.waitpid(pid, 0)
            self.forked.set_result(status)
        elif len(self.data) >= 10 and not self.more.done():
            self.more.set_result(bytes(self.data))


async def main() -> dict:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    transport, proto = await loop.connect_accepted_socket(ForkingProtocol, a)
    b.send(b"hello")
    status = await asyncio.wait_for(proto.forked, 20)
    b.send(b"world")
    more = await asyncio.wait_for(proto.more, 20)
    transport.close()
    b.close()
    return {
        "child_exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "child_signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "after_fork": more.decode(),
    }


if __name__ == "__main__":
    parent = os.getpid()
    loop = uringloop.new_event_loop(recv_multishot=sys.argv[1] == "multishot")
    try:
        result = loop.run_until_complete(main())
    except RuntimeError as exc:
        if os.getpid() != parent:
            ok = "forked child" in str(exc)
            os._exit(CHILD_RAISED_RUNTIME_ERROR if ok else CHILD_OTHER_ERROR)
        raise
    except BaseException:
        if os.getpid() != parent:
            os._exit(CHILD_OTHER_ERROR)
        raise
    if os.getpid() != parent:
        os._exit(CHILD_FINISHED_THE_LOOP)
    loop.close()
    print(json.dumps(result))
