"""Datagram transports (UDP over IPv4 and IPv6, Unix datagram sockets) on the ring.

The per-datagram work happens in `uringloop._dataplane.Datagram`: a multishot
RECVMSG turns each arriving datagram into one ``datagram_received(data, addr)``
call from C, and ``transport.sendto`` *is* the C method (bound onto the instance),
which queues the datagram for the end of the loop iteration, where the batch goes
to the kernel as SENDMSG (or SENDMSG_ZC) requests in the same ``io_uring_enter``
that waits. This class holds what asyncio's ``_SelectorDatagramTransport`` holds
(extra info, the closing state, flow-control callbacks) and the rare decisions.

Where it differs from asyncio's selector transport, on purpose:

- ``sendto()`` never sends inside the call: an ``OSError`` of the send itself
  (``EMSGSIZE``, ``ECONNREFUSED``...) reaches ``error_received()`` when the batch
  completes, in the context of the ``sendto()`` that found the transport idle, as
  asyncio reports errors of datagrams it had to buffer. Errors of the arguments
  (type, address) are raised or reported inside the call, as on asyncio's loop.
- ``get_write_buffer_size()`` counts datagrams queued this iteration and the bytes
  zero-copy sends still lend the kernel; asyncio counts only what it had to buffer.
- After ``close()`` or ``abort()``, ``sendto()`` drops the datagram and counts it
  (warning after a few, like asyncio's connected transports) on every transport;
  asyncio's unconnected one still tries to send until ``connection_lost()``.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import struct
import warnings
from asyncio import futures, selector_events, transports, trsock
from collections.abc import Iterable
from typing import Any

from ._dataplane import Datagram
from ._transports import ProtocolFlowControl, _server_detach

# Python 3.12.? and later send a zero-length datagram for sendto(b''); before, nothing.
try:
    _EMPTY_SENDS = "if not data" not in inspect.getsource(
        selector_events._SelectorDatagramTransport.sendto
    )
except (OSError, TypeError):  # no source: 3.13 is the first release that surely sends
    import sys

    _EMPTY_SENDS = sys.version_info >= (3, 13)


def _warn_send_after_close() -> None:
    asyncio.log.logger.warning("socket.send() raised exception.")


Datagram.set_warn_callback(_warn_send_after_close)


# Datagrams from this size on go zero-copy unless the loop was given a threshold.
# Measured into a dead-end veth through this transport (bench results-183113, total
# sender CPU per GiB against the copying path): 0.94x at 16 KiB, 0.91x at 32 KiB, 0.77x
# at 65,000 B, and more bytes per second at each. The stream default (64 KiB) is above
# every UDP payload, so it would never apply. Routes that copy anyway (loopback) are
# switched to plain sends after a few notifications, as streams are.
DEFAULT_DGRAM_ZC_THRESHOLD = 16 * 1024


def _zc_threshold_for(loop: Any, sock: socket.socket) -> int:
    if loop._zerocopy == "never" or sock.family == socket.AF_UNIX:
        return -1
    return loop._dgram_zc_threshold


def _pack_sockaddr(family: int, addr: Any) -> bytes:
    """A numeric address tuple (from getaddrinfo) as the bytes of a struct sockaddr."""
    if family == socket.AF_INET:
        host, port = addr[:2]
        return (
            struct.pack("=H", socket.AF_INET)
            + struct.pack("!H", port)
            + socket.inet_pton(socket.AF_INET, host)
            + bytes(8)
        )
    host, port = addr[:2]
    flowinfo = addr[2] if len(addr) > 2 else 0
    scope_id = addr[3] if len(addr) > 3 else 0
    host = host.split("%", 1)[0]
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, flowinfo)
        + socket.inet_pton(socket.AF_INET6, host)
        + struct.pack("=I", scope_id)
    )


class RingDatagramTransport(
    ProtocolFlowControl, transports._FlowControlMixin, transports.DatagramTransport
):
    """A datagram transport whose receives and sends are io_uring requests."""

    max_size = 256 * 1024  # asyncio's: what one receive takes at most

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: Any = None,
        waiter: asyncio.Future | None = None,
        extra: dict | None = None,
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
        self._family = sock.family
        self._protocol = protocol
        self._protocol_connected = True
        self._address = address
        self._server = None
        self._closing = False
        self._conn_lost = 0
        self._paused = False
        self._protocol_paused = False
        self._dgram = Datagram(
            loop._ring,
            self._sock_fd,
            sock.family,
            self,
            protocol,
            address if address else None,
            # connected: getpeername() answered. An unnamed Unix socket's peer (a
            # socketpair()) is '': asyncio's truth test takes it for unconnected and
            # fails sendto(data) fatally; uvloop sends it, and so do we.
            self._extra["peername"] is not None,
            _zc_threshold_for(loop, sock),
            loop._zerocopy == "always",
            _EMPTY_SENDS,
        )
        # The hot path: transport.sendto() is the C method itself.
        self.sendto = self._dgram.sendto  # type: ignore[method-assign]
        self._dgram.set_write_buffer_limits(self._high_water, self._low_water)
        loop._transports[self._sock_fd] = self
        loop.call_soon(self._protocol.connection_made, self)
        # only start reading when connection_made() has been called
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._sock is not None:
            info.append(f"read={'polling' if self._dgram.receiving else 'idle'}")
            info.append(f"write=<bufsize={self.get_write_buffer_size()}>")
        return "<{}>".format(" ".join(info))

    def _start_reading(self) -> None:
        if not self._closing and not self._paused:
            self._dgram.start_reading()

    # ------------------------------------------------------------ sending

    def sendto(self, data: Any, addr: Any = None) -> None:  # replaced per instance
        self._dgram.sendto(data, addr)

    def sendto_many(self, datagrams: Iterable[tuple[Any, Any]]) -> None:
        """Queue ``(data, addr)`` pairs in order, in one call (see `uringloop.sendto_many`).

        Each pair is checked as `sendto` checks it; a pair that raises stops the
        call, and the pairs before it stay queued.
        """
        self._dgram.sendto_many(datagrams)

    def get_write_buffer_size(self) -> int:
        return self._dgram.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._set_write_buffer_limits(high=high, low=low)
        self._dgram.set_write_buffer_limits(self._high_water, self._low_water)

    # ------------------------------------------------------------ reading

    def is_reading(self) -> bool:
        return not self._closing and not self._paused

    def pause_reading(self) -> None:
        self._check_usable()
        if not self.is_reading():
            return
        self._paused = True
        self._dgram.pause_reading()

    def resume_reading(self) -> None:
        self._check_usable()
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._dgram.holding:
            # what came in while paused goes to the protocol from the loop, never
            # from inside resume_reading()
            self._loop.call_soon(self._start_reading)
        else:
            self._dgram.start_reading()

    def _check_usable(self) -> None:
        if self._loop is not None and self._loop._ring.forked:
            raise RuntimeError(
                "this transport belongs to an event loop of the parent process; a forked "
                "child cannot use it (it may only close it)"
            )

    # ------------------------------------------------------------ protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._dgram.set_protocol(protocol)
        self._protocol = protocol
        self._protocol_connected = True

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._loop._ring.forked:
            self._close_in_forked_child()
            return
        self._dgram.stop_reading()
        if not self._dgram.notify_when_drained():
            self._conn_lost += 1
            self._dgram.set_conn_lost()
            self._loop.call_soon(self._call_connection_lost, None)
        # else: _datagram_drained() once the queue is out

    def abort(self) -> None:
        if self._loop is not None and self._loop._ring.forked:
            self._close_in_forked_child()
            return
        self._force_close(None)

    def _close_in_forked_child(self) -> None:
        self._closing = True
        self._conn_lost += 1
        self._dgram.close_now()  # drops references only, touches no ring
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                asyncio.log.logger.debug("%r: %s", self, message, exc_info=True)
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
        self._dgram.stop_reading()
        self._dgram.set_conn_lost()
        self._dgram.close_now()  # the queue is dropped, as asyncio clears its buffer
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            self._dgram.close_now()
            sock, self._sock = self._sock, None
            if sock is not None:
                self._loop._transports.pop(self._sock_fd, None)
                sock.close()
            self._protocol = None  # type: ignore[assignment]
            server, self._server = self._server, None
            if server is not None:
                _server_detach(server, self)

    # ------------------------------------------------ called by the Datagram

    def _datagram_drained(self) -> None:
        """close() waited for the queue: it is out."""
        if self._closing and not self._conn_lost:
            self._conn_lost += 1
            self._dgram.set_conn_lost()
            self._call_connection_lost(None)

    def _sockaddr(self, addr: Any) -> bytes:
        """A host name (or scoped IPv6 host) resolved as socket.sendto() would."""
        if self._family == socket.AF_UNIX:
            # bytearray or another buffer: as the socket module takes it
            path = bytes(addr)
            return struct.pack("=H", socket.AF_UNIX) + path + (b"\0" if path[:1] != b"\0" else b"")
        if not isinstance(addr, tuple) or len(addr) < 2:
            raise TypeError(f"sendto(): address must be a tuple, not {type(addr).__name__}")
        host = addr[0]
        if isinstance(host, (bytes, bytearray)):
            host = bytes(host).decode("idna")
        infos = socket.getaddrinfo(host, addr[1], self._family, socket.SOCK_DGRAM)
        sockaddr = infos[0][4]
        if self._family == socket.AF_INET6 and len(addr) > 2:
            sockaddr = (sockaddr[0], sockaddr[1], *addr[2:4])
            if len(addr) < 4:
                sockaddr = (*sockaddr, infos[0][4][3])
        return _pack_sockaddr(self._family, sockaddr)

    def _protocol_raised(self, exc: BaseException, callback: Any) -> None:
        """A protocol callback raised: reported as an exception in a callback."""
        self._loop.call_exception_handler(
            {
                "message": f"Exception in callback {callback!r}",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )
