"""File to socket inside the kernel: IORING_OP_SPLICE through a pipe.

`loop.sendfile()` and `loop.sock_sendfile()` move a regular file's pages to a socket
without bringing them to user space. Per chunk (the pipe's capacity, 1 MiB where the
system allows) three requests go to the ring linked, so they cost one loop iteration:

    SPLICE file -> pipe (n bytes at offset)  ->  POLL socket writable  ->  SPLICE pipe -> socket

A link breaks when a request falls short (end of file, a full socket buffer): the
requests after it complete with ECANCELED, and what is left in the pipe is drained
with POLL+SPLICE pairs. The pipe is therefore empty whenever a chunk starts, and a
pipe that could not be drained (an error, a cancelled task) is closed, not reused.

The kernel runs splice in its io-wq worker threads, so the loop thread never
blocks; the socket stays non-blocking and a splice into a full socket returns
EAGAIN, which the linked POLL makes rare.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
# NONBLOCK: a splice never sleeps on the pipe in its io-wq worker, whatever the
# pipe's own flags; the linked POLL does the waiting, and cancels cleanly.
SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
POLLOUT = 0x004
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
PIPE_WANTED = 1 << 20
IDLE_PIPES_KEPT = 4
CANCELLED_PIPE_CLOSE_DELAY = 1.0
# splices that moved nothing though the socket polled writable, before giving up
ZERO_MOVES_LIMIT = 64


def _new_pipe(wanted: int) -> tuple[int, int, int]:
    """(read fd, write fd, capacity): a non-blocking pipe of up to wanted bytes."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, F_SETPIPE_SZ, wanted)
    except OSError:
        # pipe-max-size or the user's pipe page budget says no: keep the default
        size = fcntl.fcntl(w, F_GETPIPE_SZ)
    return r, w, size


class SplicePipes:
    """Pipes for splicing, reused while they come back empty (one per sendfile at a time)."""

    def __init__(self) -> None:
        self._idle: list[tuple[int, int, int]] = []
        self._deferred: list[tuple[int, int, int]] = []
        self._forwarding: set[tuple[int, int, int]] = set()  # loop.forward()'s own

    def open_sized(self, wanted: int) -> tuple[int, int, int]:
        """A new pipe for loop.forward(), as large as allowed up to wanted bytes; it is
        closed by close_now() or, if the loop closes first, by close()."""
        pipe = _new_pipe(wanted)
        self._forwarding.add(pipe)
        return pipe

    def close_now(self, pipe: tuple[int, int, int]) -> None:
        """A forward's pipe whose requests are all complete."""
        if pipe in self._forwarding:
            self._forwarding.discard(pipe)
            os.close(pipe[0])
            os.close(pipe[1])

    def take(self) -> tuple[int, int, int]:
        """(read fd, write fd, capacity) of an empty pipe."""
        if self._idle:
            return self._idle.pop()
        return _new_pipe(PIPE_WANTED)

    def give_back(self, pipe: tuple[int, int, int], empty: bool) -> None:
        if empty and len(self._idle) < IDLE_PIPES_KEPT:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def give_back_later(self, loop: Any, pipe: tuple[int, int, int]) -> None:
        # Requests cancelled in flight may not have reached their io-wq worker yet,
        # which resolves the fd numbers only then: closing now could let a new file
        # take a number a late splice still uses.
        self._deferred.append(pipe)
        loop.call_later(CANCELLED_PIPE_CLOSE_DELAY, self._close_deferred, pipe)

    def _close_deferred(self, pipe: tuple[int, int, int]) -> None:
        if pipe in self._deferred:
            self._deferred.remove(pipe)
            self.give_back(pipe, empty=False)

    def close(self) -> None:
        """Close every pipe; the ring is closed (its requests are gone) by now."""
        self._deferred.extend(self._forwarding)
        self._forwarding.clear()
        while self._idle or self._deferred:
            r, w, _ = (self._idle or self._deferred).pop()
            os.close(r)
            os.close(w)


def _result(fut: asyncio.Future) -> int | OSError:
    exc = fut.exception()
    if exc is None:
        return fut.result()
    if isinstance(exc, OSError):
        return exc
    raise exc


def _moved(drain: asyncio.Future) -> int | OSError:
    """Bytes a pipe->socket splice moved: none when its link broke or the socket was full."""
    moved = _result(drain)
    if isinstance(moved, OSError) and moved.errno in (errno.ECANCELED, errno.EAGAIN):
        return 0
    return moved


async def splice_file_to_socket(
    loop: Any,
    ring: Any,
    pipes: SplicePipes,
    sock_fd: int,
    file_fd: int,
    offset: int,
    count: int,
    stopped: Callable[[], bool] | None = None,
) -> tuple[int, OSError | None]:
    """Move count bytes (fewer if the file ends first) from file_fd at offset to sock_fd.

    Returns (bytes that reached the socket, the error that stopped it or None).
    ``stopped()``, asked before each chunk, ends it early with ConnectionResetError
    (the transport was closed meanwhile). A cancelled task cancels the requests in
    flight and re-raises.
    """
    pipe = pipes.take()
    pipe_r, pipe_w, capacity = pipe
    sent = 0
    in_pipe = 0
    zero_moves = 0
    keys: list[int] = []
    try:
        while sent < count:
            if stopped is not None and stopped():
                return sent, ConnectionResetError(errno.ECONNRESET, "Connection lost")
            want = min(capacity, count - sent)
            fill, poll, drain = loop.create_future(), loop.create_future(), loop.create_future()
            keys = [
                ring.splice(file_fd, offset + sent, pipe_w, -1, want, SPLICE_FLAGS, fill, True),
                ring.poll_once(sock_fd, POLLOUT, poll, True),
                ring.splice(pipe_r, -1, sock_fd, -1, want, SPLICE_FLAGS, drain),
            ]
            await asyncio.wait((fill, poll, drain))
            keys = []
            filled, _ = _result(fill), _result(poll)  # each exception is retrieved
            if isinstance(filled, OSError):
                return sent, filled
            if filled == 0:
                break  # end of file
            in_pipe = filled
            moved = _moved(drain)
            if isinstance(moved, OSError):
                return sent, moved
            in_pipe -= moved
            sent += moved
            while in_pipe:
                poll, drain = loop.create_future(), loop.create_future()
                keys = [
                    ring.poll_once(sock_fd, POLLOUT, poll, True),
                    ring.splice(pipe_r, -1, sock_fd, -1, in_pipe, SPLICE_FLAGS, drain),
                ]
                await asyncio.wait((poll, drain))
                keys = []
                polled, moved = _result(poll), _moved(drain)
                if isinstance(moved, OSError):
                    return sent, moved
                if moved == 0 and isinstance(polled, OSError):
                    return sent, polled
                if moved == 0:
                    zero_moves += 1
                    if zero_moves > ZERO_MOVES_LIMIT:
                        return sent, BrokenPipeError(errno.EPIPE, "the socket takes no data")
                in_pipe -= moved
                sent += moved
        return sent, None
    finally:
        if keys:
            for key in keys:
                ring.cancel(key)
            pipes.give_back_later(loop, pipe)
        else:
            pipes.give_back(pipe, empty=in_pipe == 0)
