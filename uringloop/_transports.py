"""Stream transports (TCP and Unix sockets) on the ring.

The per-event work happens in `uringloop._dataplane.Stream`: receives go straight
from completions to ``protocol.data_received``, and ``transport.write`` *is* the C
method (bound onto the instance), so neither crosses Python. This class holds what
asyncio's transports hold (extra info, closing state, flow-control callbacks) and
the decisions that are rare: EOF, errors, close, abort, write_eof.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import inspect
import os
import socket
import struct
import sys
import termios
import warnings
import weakref
from asyncio import base_events, constants, futures, transports, trsock
from typing import Any

from ._dataplane import Stream, ZeroCopyBuffer

# Zero-copy only pays for large writes. Measured with UDP into a dead-end veth (the
# only route on a NIC-less machine where the kernel really skips the copy; `python -m
# bench --udp-sizes`), the sender's kernel CPU for SEND_ZC of a bytes object against a
# copying send was 0.80x/0.78x/1.29x at 16/32/64 KiB in one run and 1.01x/1.22x/0.87x in
# another: no crossover stands out of this machine's noise below 64 KiB, where the
# kernel docs (~10 KB) and published NIC figures agree it pays. So the default stays
# conservative. Routes that copy anyway (loopback) are switched to plain sends after a
# few notifications ("auto").
DEFAULT_ZC_THRESHOLD = 64 * 1024

# A SEND_ZC notification for TCP comes when the peer has ACKed the data. After a
# graceful close, a peer that stops reading can hold it back for ever; past this many
# seconds the socket is reset (SO_LINGER 0) so the kernel lets go of the memory.
ZC_LINGER_SECONDS = 30.0
_LINGER_ABORT = struct.pack("ii", 1, 0)

# Transports that keep their socket past connection_lost() (until a receive's end, or
# SEND_ZC notifications). A forked child inherits those descriptors but never hears of
# the completions (the ring is the parent's), so it closes its copies at once: else the
# peer would see no FIN before the child exits.
_held_past_close: weakref.WeakSet[RingStreamTransport] = weakref.WeakSet()


def _close_held_sockets_in_child() -> None:
    for transport in list(_held_past_close):
        for name in ("_sock_after_recv", "_lingering"):
            sock = getattr(transport, name, None)
            if sock is not None:
                setattr(transport, name, None)
                sock.close()  # the child's descriptor only
    _held_past_close.clear()


os.register_at_fork(after_in_child=_close_held_sockets_in_child)


def zc_threshold_for(loop: Any, sock: socket.socket) -> int:
    """The per-socket threshold for SEND_ZC, or -1 for never."""
    if loop._zerocopy == "never" or sock.family == socket.AF_UNIX:
        return -1  # AF_UNIX refuses SEND_ZC (EOPNOTSUPP)
    return loop._zc_threshold


class ProtocolFlowControl:
    """pause_writing()/resume_writing() for the native halves (Stream, Datagram), which
    call _pause_protocol/_resume_protocol when their bytes cross the water marks.

    resume_writing() goes only to a protocol that was paused itself (a protocol swapped
    in meanwhile was not; asyncio's SSLProtocol asserts on it); a callback that raises
    goes to the loop's exception handler, as on asyncio's transports.
    """

    _protocol: Any
    _loop: Any
    _protocol_paused = False

    def _pause_protocol(self) -> None:
        self._protocol_paused = True
        self._call_flow_control("pause_writing")

    def _resume_protocol(self) -> None:
        if not self._protocol_paused:
            return
        self._protocol_paused = False
        self._call_flow_control("resume_writing")

    def _call_flow_control(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{name}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )


class RingStreamTransport(ProtocolFlowControl, transports._FlowControlMixin, transports.Transport):
    """A stream transport whose reads and writes are io_uring requests."""

    _start_tls_compatible = True
    # loop.sendfile() splices the file in the kernel (see _splice.py)
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future | None = None,
        extra: dict | None = None,
        server: Any = None,
    ) -> None:
        super().__init__(extra, loop)
        self._extra["socket"] = trsock.TransportSocket(sock)
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            self._extra["sockname"] = None
        if "peername" not in self._extra:
            try:
                self._extra["peername"] = sock.getpeername()
            except OSError:
                self._extra["peername"] = None
        self._sock: socket.socket | None = sock
        self._sock_fd = sock.fileno()
        self._protocol = protocol
        self._server = server
        self._closing = False
        self._eof = False
        self._conn_lost = 0
        self._paused = False
        self._abortive = False
        # closed while a receive was still in the kernel: the socket waits for its end
        self._sock_after_recv: socket.socket | None = None
        self._lingering: socket.socket | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._empty_waiter: asyncio.Future | None = None
        self._sock_after_sendfile: socket.socket | None = None
        # loop.forward(): the Forwarder reading from this transport's socket, and the
        # one writing to it (which holds _empty_waiter, as a sendfile does)
        self._forward_src: Any = None
        self._forward_dst: Any = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            base_events._set_nodelay(sock)
        self._stream = Stream(
            loop._ring,
            self._sock_fd,
            self,
            protocol,
            zc_threshold_for(loop, sock),
            isinstance(protocol, asyncio.BufferedProtocol),
            loop._zerocopy == "always",
        )
        # The hot path: transport.write() is the C method itself.
        self.write = self._stream.write  # type: ignore[method-assign]
        self._stream.set_write_buffer_limits(self._high_water, self._low_water)
        if server is not None:
            _server_attach(server, self)
        loop._transports[self._sock_fd] = self
        loop.call_soon(self._protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<RingStreamTransport fd={self._sock_fd} {state}>"

    def _start_reading(self) -> None:
        if not self._closing and not self._paused and self._forward_src is None:
            self._stream.start_reading()

    # ------------------------------------------------------------ reading

    def is_reading(self) -> bool:
        return not self._paused and not self._closing and self._forward_src is None

    def pause_reading(self) -> None:
        self._stream.ensure_usable()  # RuntimeError in a forked child
        if self._closing or self._paused:
            return
        self._paused = True
        if self._forward_src is None:  # (a forward keeps the stream paused itself)
            self._stream.pause_reading()

    def resume_reading(self) -> None:
        self._stream.ensure_usable()
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._forward_src is not None:
            return  # remembered: reading resumes when the forward ends
        if self._stream.holding:
            # What a recv brought in while paused goes to the protocol from the loop,
            # never from inside resume_reading(): StreamReader resumes first and only
            # then sets up the waiter that data must wake (as on asyncio's loop).
            self._loop.call_soon(self._deliver_held)
        else:
            self._stream.start_reading()

    def _deliver_held(self) -> None:
        if not self._paused and not self._closing and self._forward_src is None:
            self._stream.start_reading()

    # ------------------------------------------------------------ loop.forward()

    def _forward_begin(self, forwarder: Any) -> None:
        """This transport's socket is forward()'s source from now: the stream stops
        reading (the protocol's own pause/resume are remembered for the end)."""
        self._stream.pause_reading()
        self._forward_src = forwarder

    def _forward_end(self) -> None:
        self._forward_src = None
        if not self._paused and not self._closing:
            self._loop.call_soon(self._deliver_held)
        self._close_after_splices()

    def _forward_write(self, data: bytes) -> asyncio.Future:
        """While forward() owns the send side: data goes out ahead of the splices; the
        future is done once everything queued is sent."""
        self._stream.set_sendfile_active(0)
        try:
            self._stream.write(data)
        finally:
            self._stream.set_sendfile_active(2)
        waiter = self._empty_waiter
        if waiter is None or waiter.done():
            waiter = self._empty_waiter = self._loop.create_future()
        self._stream.notify_when_flushed()
        return waiter

    def _close_after_splices(self) -> None:
        """The socket's close waited for the splices naming its fd (see _call_connection_lost)."""
        if self._empty_waiter is None and self._forward_src is None:
            sock, self._sock_after_sendfile = self._sock_after_sendfile, None
            if sock is not None:
                self._shutdown_blocked_send(sock)  # (as _call_connection_lost's own close)
                self._close_socket(sock)

    # ------------------------------------------------------------ writing

    def write(self, data: Any) -> None:  # replaced per instance by Stream.write
        self._stream.write(data)

    def writelines(self, list_of_data: Any) -> None:
        """All or nothing, as on asyncio's loop (which joins the items, or takes each as
        a memoryview, before it writes): every item is taken as a buffer first, so a
        bad one raises before any is written; any bytes-like item is accepted."""
        write = self._stream.write
        if sys.version_info >= (3, 12) and not list_of_data:
            write(b"")  # (3.12+ checks the state, then returns for a false argument: None too)
            return
        items = [
            data
            if isinstance(data, (bytes, bytearray, memoryview, ZeroCopyBuffer))
            else memoryview(data)
            for data in list_of_data
        ]
        if not items:
            write(b"")  # raises what write() raises (after write_eof(), during a sendfile)
        for index, data in enumerate(items):
            try:
                write(data)
            except Exception as exc:
                if index:
                    # (no memory or no SQE for a later item) the first ones are queued:
                    # the stream cannot go on without the rest, so the transport fails
                    self._fatal_error(exc, "Fatal error on transport.writelines()")
                raise

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._stream.ensure_usable()  # a child must not shut down the parent's socket
        if self._closing or self._eof:
            return
        self._eof = True
        self._stream.set_eof()
        self._stream.notify_when_flushed()

    def get_write_buffer_size(self) -> int:
        return self._stream.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._set_write_buffer_limits(high=high, low=low)
        self._stream.set_write_buffer_limits(self._high_water, self._low_water)

    def _make_empty_waiter(self, owner: int = 1) -> asyncio.Future:
        """For loop.sendfile() (owner 1) and loop.forward() (2): a future done once
        every write so far went out.

        From now until _reset_empty_waiter(), write() raises RuntimeError, as asyncio's
        transports do while a sendfile owns the socket.
        """
        if self._empty_waiter is not None:
            raise RuntimeError("Empty waiter is already set")
        self._empty_waiter = self._loop.create_future()
        self._stream.set_sendfile_active(owner)
        self._stream.notify_when_flushed()
        return self._empty_waiter

    def _reset_empty_waiter(self) -> None:
        self._empty_waiter = None
        self._stream.set_sendfile_active(0)
        self._close_after_splices()

    # ------------------------------------------------------------ protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._stream.set_protocol(protocol, isinstance(protocol, asyncio.BufferedProtocol))
        self._protocol = protocol
        # pause_writing() went to the old protocol: resume_writing() must not go to
        # this one unless it was paused itself (asyncio's SSLProtocol asserts on it)
        self._protocol_paused = False

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        if self._stream.forked:
            self._close_in_forked_child()
            return
        self._closing = True
        self._stream.pause_reading()
        if self._forward_src is not None:  # (reading ends at close(): the forward's too)
            self._forward_src.stop(ConnectionResetError(errno.ECONNRESET, "Connection lost"))
        self._stream.notify_when_flushed()

    def abort(self) -> None:
        if self._stream.forked:
            self._close_in_forked_child()
            return
        self._abortive = True
        self._force_close(None)

    def _close_in_forked_child(self) -> None:
        """A forked child lets go of its copy of the socket; the ring is the parent's."""
        self._closing = True
        self._conn_lost += 1
        self._stream.close_now()  # drops references only, touches no ring
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # the child's descriptor; the parent's connection stays

    def __del__(self) -> None:
        if self._sock is not None and not self._closing:
            warnings.warn(
                f"unclosed transport {self!r}", ResourceWarning, source=self, stacklevel=2
            )
            self._sock.close()

    # ------------------------------------------------ called by the Stream

    def _stream_flushed(self) -> None:
        waiter = self._empty_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._closing:
            self._force_close(None)
        elif self._eof and self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._fatal_error(exc, "Fatal error on shutdown(SHUT_WR)")

    def _stream_eof(self) -> None:
        if self._loop.get_debug():
            base_events.logger.debug("%r received EOF", self)
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def _stream_error(self, exc: OSError) -> None:
        self._fatal_error(exc, "Fatal error on socket transport")

    def _protocol_error(self, exc: BaseException) -> None:
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            # like asyncio: these escape the loop, after the transport is torn down
            self._force_close(exc)
            raise exc
        self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    # ------------------------------------------------------------ teardown

    def _close_socket(self, sock: socket.socket) -> None:
        """Close once no receive of this transport is left in the kernel.

        A receive still there (its cancel goes with close_now(), and on COOP_TASKRUN
        rings completes an iteration later) may yet take bytes from the socket that the
        protocol will never get; on asyncio's loop they would be unread in the socket
        and its close() would reset the connection. So the socket waits for the
        receive's end (_stream_recv_over), then closes as _close_socket_now says. The
        end of the stream goes at once all the same (shutdown): asyncio's close() sends
        the FIN now, and bytes the peer sends after it reset the connection after it.
        """
        if self._stream.dropped_bytes:
            self._close_socket_now(sock)  # a reset, whenever the receive lets go
            return
        if self._stream.notify_when_recv_over():
            if _unread_bytes(sock):
                _reset_and_close(sock)  # (the receive may yet take them: asked for now)
                return
            if not (self._abortive and self._stream.pinned):
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            self._sock_after_recv = sock
            self._loop._lingering.add(self)
            _held_past_close.add(self)
            return
        self._close_socket_now(sock)

    def _stream_recv_over(self) -> None:
        sock, self._sock_after_recv = self._sock_after_recv, None
        if sock is not None:
            self._loop._lingering.discard(self)
            self._close_socket_now(sock)

    def _close_socket_now(self, sock: socket.socket) -> None:
        """Close now, unless SEND_ZC memory still waits for its notifications.

        Those wait for the peer's ACK: keep the connection until they are in (the
        Stream calls _stream_unpinned), or reset it after ZC_LINGER_SECONDS. abort()
        resets at once, which makes the kernel release the memory promptly. What the
        peer sees is what close() shows it on any loop: a socket with unread data is
        reset now (the kernel's close() does that too, and frees the memory with it);
        otherwise the end of the stream (FIN) goes now, only the descriptor waits.
        Bytes the ring received that the protocol never got (held while it paused
        reading, or taken by a receive that ended after close) count as unread: they
        reset the connection too, asked for with SO_LINGER 0 since the kernel saw them
        read.
        """
        if self._stream.dropped_bytes:
            _reset_and_close(sock)
        elif not self._stream.pinned:
            sock.close()  # (bytes unread in the socket: the kernel's close() resets)
        elif self._abortive or _unread_bytes(sock):
            _reset_and_close(sock)
        else:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._lingering = sock
            self._loop._lingering.add(self)
            _held_past_close.add(self)
            self._linger_timer = self._loop.call_later(
                self._loop._zc_linger_seconds, self._linger_expired
            )

    def _stream_unpinned(self) -> None:
        sock, self._lingering = self._lingering, None
        if sock is not None:
            self._loop._lingering.discard(self)
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            sock.close()

    def _linger_expired(self) -> None:
        sock, self._lingering = self._lingering, None
        if sock is not None:
            self._loop._lingering.discard(self)
            _reset_and_close(sock)

    def _shutdown_blocked_send(self, sock: socket.socket) -> None:
        """A send no cancel reached (blocked in an io-wq worker, see ring.c) holds the
        socket open past close(): shutting the sending side down ends it (EPIPE)."""
        if self._stream.send_in_kernel:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _reset_for_loop_close(self) -> None:
        """loop.close(): no iteration will wait for the notifications any more."""
        sock, self._sock_after_recv = self._sock_after_recv, None
        if sock is not None:  # (the ring's close ends the receive)
            self._loop._lingering.discard(self)
            self._close_socket_now(sock)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._linger_expired()
        if self._sock is not None and self._conn_lost:
            # aborted, connection_lost() still to come: the ring's close cannot shut a
            # closed stream's socket down itself (its fd number may be reused by then)
            self._shutdown_blocked_send(self._sock)
        if self._sock is not None and self._stream.pinned:
            self._abortive = True
            self._force_close(None)
            sock, self._sock = self._sock, None
            _reset_and_close(sock)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        # as asyncio's transports: an OSError (ENOTCONN, EINVAL... not only a reset) is
        # the connection's end, logged in debug mode, never the exception handler's
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                base_events.logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        self._closing = True
        self._conn_lost += 1
        waiter = self._empty_waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
        for forwarder in (self._forward_src, self._forward_dst):
            if forwarder is not None:
                forwarder.stop(ConnectionResetError(errno.ECONNRESET, "Connection lost"))
        self._stream.close_now()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            sock, self._sock = self._sock, None
            if sock is not None:
                self._loop._transports.pop(self._sock_fd, None)
                if self._stream.forked:
                    sock.close()  # the child's descriptor only: the socket is the parent's
                elif self._empty_waiter is not None or self._forward_src is not None:
                    # a splice may be using the fd: closing it could hand the number
                    # to another file under the kernel's feet
                    self._sock_after_sendfile = sock
                else:
                    self._shutdown_blocked_send(sock)
                    self._close_socket(sock)
            self._protocol = None  # type: ignore[assignment]
            server, self._server = self._server, None
            if server is not None:
                _server_detach(server, self)


# Server._attach/_detach take the transport from 3.13 on (for close_clients()).
_SERVER_TRACKS_TRANSPORTS = len(inspect.signature(base_events.Server._attach).parameters) > 1


def _unread_bytes(sock: socket.socket) -> int:
    """How many received bytes wait in the socket (SIOCINQ); 0 when it cannot say."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0


def _reset_and_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass
    sock.close()


def _server_attach(server: Any, transport: Any) -> None:
    if _SERVER_TRACKS_TRANSPORTS:
        server._attach(transport)
    else:
        server._attach()


def _server_detach(server: Any, transport: Any) -> None:
    if _SERVER_TRACKS_TRANSPORTS:
        server._detach(transport)
    else:
        server._detach()


def sock_is_stream(sock: socket.socket) -> bool:
    return sock.type == socket.SOCK_STREAM and sock.family in (
        socket.AF_INET,
        socket.AF_INET6,
        socket.AF_UNIX,
    )
