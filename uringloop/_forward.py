"""Stream to stream inside the kernel: `loop.forward()`, socket -> pipe -> socket.

A proxy's bytes need not enter the process: splice(2) moves them from the source
socket into a pipe and from the pipe into the destination socket as page references,
never copied to or from user space. The loop drives it by readiness: a native pump
(native/forward.c, no Python per chunk) moves
what it can with non-blocking splices, and when a side would block it asks the ring
for a one-shot POLL on that socket and runs again when the POLL completes.

    pump:  splice source -> pipe (its free room)  ->  splice pipe -> destination
           EAGAIN on the source: POLL it readable; on the destination: POLL it writable

Some facts about splicing sockets
---------------------------------
- splice socket -> pipe takes the received skb's pages by reference; pipe -> socket
  hands them to TCP (MSG_SPLICE_PAGES) without a copy. On loopback the receiver's
  own recv() still copies, as it does for any sender.
- SPLICE_F_NONBLOCK (with non-blocking sockets) makes a splice that cannot move
  anything return EAGAIN at once: an empty socket, a full pipe, a full socket buffer.
  The loop thread never sleeps in one.
- Why not IORING_OP_SPLICE: the kernel always runs it in an io-wq worker thread
  (REQ_F_FORCE_ASYNC), so each one costs a worker wake-up and two context switches,
  and the worker looks the fd numbers up only when it runs. Measured with the proxy
  benchmark (256 KiB flows, one and 16 connections), POLL + SPLICE chains on the ring
  cost 1.7-1.9x the proxy CPU of this pump (1.2-1.4x of it written in Python); file ->
  socket (`sendfile`, _splice.py), where a splice may wait for the disk, is where io-wq
  pays.
- A pipe's capacity is counted in slots, one per page reference: a socket's small
  fragments can fill it with fewer bytes than its size. So EAGAIN from the source
  while the pipe holds bytes may mean a full pipe: the pump then waits for the
  destination (whose POLL is armed, since those bytes could not go) instead of
  polling the source, which would spin on a readable socket.
- Pipe sizes are capped by /proc/sys/fs/pipe-max-size and the user's pipe budget;
  a pipe that cannot grow keeps the system's default (64 KiB).

Semantics (the loop method's docstring is the user's version)
-------------------------------------------------------------
- Back-pressure: the pipe is the only buffer. While it cannot take more, nothing is
  read from the source, so a destination that stops reading stops the source.
- The source transport's protocol sees no data meanwhile (reading is paused, and
  pause_reading()/resume_reading() from the protocol are remembered for the end);
  bytes the transport had received but not delivered go to the destination first,
  then every write the destination had queued is flushed, then splicing starts.
  During the forward, write() on the destination raises RuntimeError.
- Source EOF: the pipe is drained, then `write_eof()` on the destination (unless
  told otherwise), and the count is returned. The source's protocol hears the EOF
  itself once reading resumes, as it would have without the forward.
- A source error (a reset) is raised after the pipe's bytes reached the destination;
  a destination error is raised at once (its connection is gone, with the pipe's bytes).
- close()/abort() of either transport, or the task's cancellation, cancels the POLLs
  and waits for them. Bytes then left in the pipe are read out and written to the
  destination transport while it is open (delivered, never lost while both are
  alive); if the destination is gone they go with it.
- Copy mode (a kernel without splice for these sockets, `splice=False`): the same
  pump with recv()/send() and a buffer of its own as the pipe. Same semantics.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from ._dataplane import Forward

DEFAULT_PIPE_SIZE = 256 * 1024
# copy mode's buffer (the pipe's part), in the native pump
COPY_CHUNK = 256 * 1024


class Forwarder:
    """One direction of one forward(): the native pump (native/forward.c) and what the
    Python side needs of it. `settled` gets its result once no POLL is in flight and
    the pump will not run again (the end, or a stop)."""

    def __init__(
        self,
        loop: Any,
        src: Any,
        dst: Any,
        pipe: tuple[int, int, int] | None,
        copy_capacity: int = COPY_CHUNK,
    ) -> None:
        self.pipe = pipe
        self.settled = loop.create_future()
        self.stop_reason: BaseException | None = None
        pipe_r, pipe_w, capacity = pipe if pipe is not None else (-1, -1, copy_capacity)
        self.pump = Forward(
            loop._ring, src._sock_fd, dst._sock_fd, pipe_r, pipe_w, capacity, self.settled
        )

    @property
    def in_pipe(self) -> int:
        return self.pump.in_pipe

    def start(self) -> None:
        self.pump.start()

    def stop(self, reason: BaseException) -> None:
        """Stop (close, abort, cancellation); `settled` follows once the kernel is done
        with the POLLs."""
        if self.settled.done():
            return  # (over already: a close right after the EOF does not undo the result)
        if self.stop_reason is None:
            self.stop_reason = reason
        self.pump.stop()

    def error(self) -> BaseException | None:
        """What ended it, if not the source's EOF: a socket's error, else the stop's reason."""
        return self.pump.error or self.stop_reason


def _check_transport(transport: Any, role: str, loop: Any) -> None:
    from ._transports import RingStreamTransport  # (a cycle at import time otherwise)

    if not isinstance(transport, RingStreamTransport):
        extra = getattr(transport, "get_extra_info", None)  # (any object may come)
        if hasattr(transport, "_ssl_protocol") or (
            callable(extra) and extra("sslcontext") is not None
        ):
            raise TypeError(
                f"forward() cannot use a TLS transport as {role}: its bytes must be "
                "decrypted or encrypted in user space; copy them with data_received() "
                "and write() instead"
            )
        raise TypeError(
            f"forward() needs stream transports of a uringloop loop, got {transport!r} as {role}"
        )
    if transport._loop is not loop:
        raise ValueError(f"the {role} transport belongs to another loop")
    from asyncio import sslproto

    if isinstance(transport._protocol, sslproto.SSLProtocol):
        raise TypeError(
            f"forward() cannot use a TLS connection's socket as {role}: its bytes must be "
            "decrypted or encrypted in user space"
        )
    transport._stream.ensure_usable()  # RuntimeError in a forked child
    if transport.is_closing():
        raise RuntimeError(f"the {role} transport is closing")
    if role == "destination" and transport._eof:
        raise RuntimeError("cannot forward() to a transport after write_eof()")


async def forward(
    loop: Any, src: Any, dst: Any, *, write_eof: bool, pipe_size: int | None, splice: bool
) -> int:
    """loop.forward(): see its docstring and this module's."""
    _check_transport(src, "source", loop)
    _check_transport(dst, "destination", loop)
    if pipe_size is None:
        pipe_size = DEFAULT_PIPE_SIZE
    elif not isinstance(pipe_size, int) or isinstance(pipe_size, bool):
        raise TypeError(f"pipe_size must be an int, got {type(pipe_size).__name__}")
    elif pipe_size <= 0:
        raise ValueError(f"pipe_size must be positive, got {pipe_size}")
    if src._forward_src is not None:
        raise RuntimeError("the source transport is already being forwarded")
    stats = loop._splice_stats
    dst._make_empty_waiter(2)  # (RuntimeError if a sendfile or a forward writes to it)
    pipe = None
    try:
        # (splice(2) is a syscall, not a ring opcode: where the kernel refuses it for
        # these sockets, the pump's first move finds out and copies instead)
        pipe = loop._splice_pipes.open_sized(pipe_size) if splice else None
        # (copy mode: its buffer holds no more than the pipe would)
        forwarder = Forwarder(loop, src, dst, pipe, min(pipe_size, COPY_CHUNK))
    except BaseException:
        dst._reset_empty_waiter()
        if pipe is not None:
            loop._splice_pipes.close_now(pipe)
        raise
    try:
        src._forward_begin(forwarder)  # (its pause may find no SQE for the cancel)
    except BaseException:
        dst._reset_empty_waiter()
        if pipe is not None:
            loop._splice_pipes.close_now(pipe)
        raise
    stats["forward_calls"] += 1
    dst._forward_dst = forwarder
    sent_first = 0
    try:
        # The receive pause_reading() cancelled may still bring bytes; they are held.
        spins = 0
        while src._stream.recv_in_kernel and not src._conn_lost:
            await asyncio.sleep(0 if spins < 16 else 0.001)
            spins += 1
        held, end = (None, 0) if src._conn_lost else src._stream.take_held()
        if held and not dst._conn_lost:
            sent_first = len(held)
            stats["forward_copied_bytes"] += sent_first
            flushed = dst._forward_write(held)
        else:
            flushed = dst._empty_waiter
        # everything the destination had queued is out (or a stop: a close or an abort)
        if not flushed.done():
            await asyncio.wait({flushed, forwarder.settled}, return_when=asyncio.FIRST_COMPLETED)
        if flushed.done():
            flushed.result()  # (the destination's error)
        if dst._conn_lost or src._conn_lost:
            raise ConnectionResetError(errno.ECONNRESET, "Connection lost")
        if end < 0:
            raise OSError(-end, os.strerror(-end))
        if forwarder.stop_reason is not None:
            raise forwarder.stop_reason
        if end == 0:
            forwarder.start()
            # (shielded: a cancellation must not mark it done while requests run)
            await asyncio.shield(forwarder.settled)
    except BaseException:
        forwarder.stop(asyncio.CancelledError())
        if loop.is_closed():
            raise  # (the ring's close ended its requests, and closed the pipe)
        try:
            cancelled_again = await _settle_through_cancellation(forwarder)
        finally:
            _finish(loop, forwarder, src, dst)
        if cancelled_again:
            raise asyncio.CancelledError from None
        raise
    moved = _finish(loop, forwarder, src, dst)
    pump = forwarder.pump
    errors = [
        (transport, OSError(err, os.strerror(err)))
        for transport, err in ((dst, pump.dst_errno), (src, pump.src_errno))
        if err
    ]
    for transport, exc in errors:
        # The kernel reports a socket's error once, and the pump took it: the
        # transport ends with it, as it would have reading the socket itself.
        transport._fatal_error(exc, "Fatal error on a forwarded socket")
    if errors:
        raise errors[0][1]  # (the destination's first)
    error = forwarder.error()
    if error is not None:
        raise error
    if write_eof and not dst.is_closing():
        dst.write_eof()
    return sent_first + moved


async def _settle_through_cancellation(forwarder: Forwarder) -> bool:
    """Wait until the kernel is done with both chains (the pipe and the fds are its
    until then), through further cancellations: whether there was one."""
    cancelled = False
    while not forwarder.settled.done():
        try:
            await asyncio.shield(forwarder.settled)
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


def _finish(loop: Any, forwarder: Forwarder, src: Any, dst: Any) -> int:
    """Settled: both transports are given back, the pipe's bytes to an open
    destination; how many bytes reached the destination."""
    pump = forwarder.pump
    leftover = pump.take_leftover()
    moved = pump.moved
    stats = loop._splice_stats
    stats["forward_spliced_bytes"] += pump.spliced
    stats["forward_copied_bytes"] += pump.copied
    if forwarder.pipe is not None:
        loop._splice_pipes.close_now(forwarder.pipe)
    dst._forward_dst = None
    if dst._empty_waiter is not None:
        dst._reset_empty_waiter()
    try:
        if leftover and not dst.is_closing() and not dst._eof:
            dst.write(leftover)
            moved += len(leftover)
            stats["forward_copied_bytes"] += len(leftover)
    finally:
        src._forward_end()
    return moved
