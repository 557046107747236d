"""The event loop: a native scheduler on top of one io_uring.

How it sits on asyncio
----------------------
`UringEventLoop` derives from the native `LoopCore` first and from asyncio's
`SelectorEventLoop` second. LoopCore (native/sched.c) owns what runs per iteration:
the ready queue, the timer heap, ``call_soon``/``call_later``/``call_at``/
``call_soon_threadsafe`` (which return asyncio's own ``Handle`` and ``TimerHandle``
objects, made in C) and ``_run_once``: compute how long it may sleep (zero when
callbacks are ready, the time to the next timer otherwise, forever when idle), submit
every request prepared since the last iteration and wait in a single
``io_uring_enter`` with that timeout, reap the completions in C (resolving futures
and calling protocols directly), move due timers to the ready queue, and run the
handles that were ready, each in its context. Everything that is not per iteration
(executors, DNS, servers, subprocesses, ``run_until_complete``, exception handling,
async generator hooks) stays asyncio's Python; in debug mode scheduling and running
handles go through asyncio's Python too, so its checks and warnings are the same.

Everything asyncio builds on readiness (``add_reader``/``add_writer`` and the
transports, pipes, subprocesses and signal wake-ups built on them) keeps working
because `RingSelector` implements the selector interface with POLL_ADD requests
on the same ring: each registered fd has one poll request, re-armed after it
fires, which gives epoll's level-triggered semantics. Nothing waits in epoll,
poll or select; the socket methods (``sock_recv``, ``sock_sendall``, ...) go
straight to io_uring operations.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import errno
import io
import logging
import operator
import os
import resource
import selectors
import signal
import socket
import stat
import sys
import threading
import warnings
import weakref
from asyncio import base_events, events, exceptions, format_helpers, unix_events
from collections.abc import Callable
from typing import Any

from . import _forward, _ring
from ._datagram import DEFAULT_DGRAM_ZC_THRESHOLD, RingDatagramTransport
from ._dataplane import LoopCore, Ring, ZeroCopyBuffer
from ._splice import SplicePipes, splice_file_to_socket
from ._transports import (
    DEFAULT_ZC_THRESHOLD,
    ZC_LINGER_SECONDS,
    RingStreamTransport,
    sock_is_stream,
)

logger = logging.getLogger("uringloop")

POLLIN = 0x001
POLLOUT = 0x004
_POLLIN_LIKE = ~POLLOUT & 0xFFFF
_POLLOUT_LIKE = ~POLLIN & 0xFFFF

# How long loop.close() waits for the kernel to hand back cancelled requests
# before it gives up and keeps their memory for the life of the process. Cancelled
# requests come back at once; only a ring another thread owns (SINGLE_ISSUER), or
# SEND_ZC memory of a sock_sendzc() whose peer never acknowledges, waits this long.
CLOSE_DRAIN_SECONDS = 10.0

# Rings whose requests still referenced memory at close: never freed.
_KEPT_ALIVE: list[tuple[Ring, object]] = []


class _RecvBacklog:
    """What cancelled receives on one socket brought in, and which are still in flight."""

    __slots__ = ("sock", "data", "datagrams", "pending", "drained")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = weakref.ref(sock)
        self.data = bytearray()
        self.datagrams: collections.deque[tuple[bytes, Any]] = collections.deque()
        self.pending: set[int] = set()  # keys of cancelled requests still in the kernel
        self.drained: asyncio.Future | None = None  # done once pending is empty


def _poll_mask(events: int) -> int:
    mask = 0
    if events & selectors.EVENT_READ:
        mask |= POLLIN
    if events & selectors.EVENT_WRITE:
        mask |= POLLOUT
    return mask


def _check_pollable(fd: int) -> None:
    """Raise what epoll_ctl(2) raises from asyncio's selector for an fd it cannot watch.

    A POLL_ADD on a closed fd fails only in its completion, and one on a regular file
    or a directory succeeds at once and for ever, so register() would return as if
    all was well: EBADF and EPERM here instead, as add_reader() raises on asyncio's loop.
    """
    mode = os.fstat(fd).st_mode  # OSError(EBADF) for a closed fd
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))


def _descriptor_free(sock: socket.socket) -> bool:
    """Whether this process may open one more descriptor under its RLIMIT_NOFILE now.

    (dup() takes the lowest free number below the limit, as accept() does.)
    """
    try:
        fd = os.dup(sock.fileno())
    except OSError:
        return False
    os.close(fd)
    return True


class RingSelector(selectors._BaseSelectorImpl):  # type: ignore[name-defined]
    """The selector interface over POLL_ADD requests on the loop's ring."""

    def __init__(self, ring: Ring) -> None:
        super().__init__()
        self._ring = ring
        self._poll_keys: dict[int, int] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = super().register(fileobj, events, data)
        try:
            _check_pollable(key.fd)
            self._poll_keys[key.fd] = self._ring.poll_add(key.fd, _poll_mask(events))
        except BaseException:
            super().unregister(fileobj)
            raise
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = super().unregister(fileobj)
        poll_key = self._poll_keys.pop(key.fd, None)
        if poll_key is not None:
            self._ring.cancel(poll_key)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        try:
            old = self._fd_to_key[self._fileobj_lookup(fileobj)]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != old.events:
            if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
                raise ValueError(f"Invalid events: {events!r}")
            self._poll_keys[old.fd] = self._ring.poll_modify(
                self._poll_keys[old.fd], _poll_mask(events)
            )
        key = old._replace(events=events, data=data)
        self._fd_to_key[key.fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        fired = self._ring.wait(timeout)
        if fired is None:
            return []
        return self.fired_keys(fired)

    def fired_keys(self, fired: list[tuple[int, int]]) -> list[tuple[selectors.SelectorKey, int]]:
        """The selector's answer for the polls one ring wait reported as fired."""
        ready = []
        fd_to_key = self._fd_to_key
        for fd, revents in fired:
            key = fd_to_key.get(fd)
            if key is None:
                continue
            events = 0
            if revents & _POLLIN_LIKE:
                events |= selectors.EVENT_READ
            if revents & _POLLOUT_LIKE:
                events |= selectors.EVENT_WRITE
            ready.append((key, events & key.events))
        return ready

    def close(self) -> None:
        for fd in list(self._poll_keys):
            self._ring.cancel(self._poll_keys.pop(fd))
        super().close()


# Defaults of the zero-copy memory bounds (see UringEventLoop).
DEFAULT_ZC_POOL_SIZE = 16 << 20
DEFAULT_ZC_PINNED_LIMIT = 64 << 20
DEFAULT_ZC_TRANSPORT_PINNED_LIMIT = 4 << 20


CAP_IPC_LOCK = 14


def _memlock_budget() -> int:
    """Bytes SEND_ZC may still pin before RLIMIT_MEMLOCK refuses it, halved (-1: no
    limit applies to this process).

    Without CAP_IPC_LOCK the kernel charges the pages a zero-copy send pins, like the
    ring itself and a registered arena, to RLIMIT_MEMLOCK, per user (other processes of
    the user share it: hence the half); VmPin in /proc/self/status is what this process
    holds already. Datagrams that would go above it are copied (Ring.zc_pin_budget).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return -1
    fields: dict[str, str] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if int(fields["CapEff"], 16) & (1 << CAP_IPC_LOCK):
            return -1
        pinned = int(fields.get("VmPin", "0 kB").split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pinned = 0
    return max(0, soft - pinned) // 2


def _size_option(name: str, value: int | None, env: str | None, default: int) -> int:
    """A byte count from the argument, else the environment, else the default."""
    if value is None:
        raw = os.environ.get(env) if env else None
        value = int(raw) if raw else default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0")
    return value


def _zerocopy_options(zerocopy: str | None, zc_threshold: int | None) -> tuple[str, int]:
    """The zerocopy mode and threshold: arguments first, then the environment."""
    zerocopy = zerocopy or os.environ.get("URINGLOOP_ZEROCOPY", "auto")
    if zerocopy not in ("auto", "always", "never"):
        raise ValueError(f"zerocopy must be 'auto', 'always' or 'never', not {zerocopy!r}")
    zc_threshold = _size_option(
        "zc_threshold", zc_threshold, "URINGLOOP_ZC_THRESHOLD", DEFAULT_ZC_THRESHOLD
    )
    return zerocopy, zc_threshold


class UringEventLoop(LoopCore, asyncio.SelectorEventLoop):  # type: ignore[misc,valid-type]
    """An asyncio event loop whose only way of waiting and doing I/O is one io_uring.

    ``setup`` picks the ring's set-up flags: ``"auto"`` (the default, or the
    ``URINGLOOP_RING_SETUP`` environment variable) tries SINGLE_ISSUER|DEFER_TASKRUN
    first and steps down on EINVAL; ``"defer"``, ``"coop"`` and ``"plain"`` force a rung.
    ``zerocopy`` (``"auto"``, ``"always"``, ``"never"``; ``URINGLOOP_ZEROCOPY``) and
    ``zc_threshold`` (bytes; ``URINGLOOP_ZC_THRESHOLD``) decide which writes use SEND_ZC.
    ``recv_multishot`` (default: where the kernel has it; ``URINGLOOP_RECV_MULTISHOT=0``
    turns it off) makes stream transports read with one multishot recv from a shared
    buffer ring instead of one recv per read.
    Memory lent to the kernel by zero-copy sends is bounded: ``zc_pinned_limit`` bytes
    for the loop (64 MiB) and ``zc_transport_pinned_limit`` per transport (4 MiB);
    past either, the transports holding it get ``pause_writing()`` until notifications
    bring it back down (0: no bound). ``zc_pool_size`` (16 MiB;
    ``URINGLOOP_ZC_POOL_SIZE``) is the registered arena behind `alloc_zerocopy_buffer`,
    halved while RLIMIT_MEMLOCK refuses it.
    Raises `uringloop.UringUnavailableError` when io_uring cannot be used.
    """

    def __init__(
        self,
        *,
        setup: str | None = None,
        zerocopy: str | None = None,
        zc_threshold: int | None = None,
        recv_multishot: bool | None = None,
        zc_pool_size: int | None = None,
        zc_pinned_limit: int | None = None,
        zc_transport_pinned_limit: int | None = None,
    ) -> None:
        try:
            threshold_given = (
                zc_threshold is not None or os.environ.get("URINGLOOP_ZC_THRESHOLD") is not None
            )
            zerocopy, zc_threshold = _zerocopy_options(zerocopy, zc_threshold)
            zc_pool_size = _size_option(
                "zc_pool_size", zc_pool_size, "URINGLOOP_ZC_POOL_SIZE", DEFAULT_ZC_POOL_SIZE
            )
            zc_pinned_limit = _size_option(
                "zc_pinned_limit", zc_pinned_limit, None, DEFAULT_ZC_PINNED_LIMIT
            )
            zc_transport_pinned_limit = _size_option(
                "zc_transport_pinned_limit",
                zc_transport_pinned_limit,
                None,
                DEFAULT_ZC_TRANSPORT_PINNED_LIMIT,
            )
            features = _ring.probe()
            ring_setup = _ring.create_ring(setup or os.environ.get("URINGLOOP_RING_SETUP", "auto"))
        except BaseException:
            self._closed = True  # BaseEventLoop.__del__ looks at it
            raise
        self._zerocopy = zerocopy
        self._zc_threshold = zc_threshold
        # datagrams: the loop's threshold when one was given, else their own default
        self._dgram_zc_threshold = zc_threshold if threshold_given else DEFAULT_DGRAM_ZC_THRESHOLD
        self._zc_linger_seconds = ZC_LINGER_SECONDS
        self._lingering: set[RingStreamTransport] = set()
        self._ring_setup: _ring.RingSetup | None = ring_setup
        address = int(_ring.ffi.cast("uintptr_t", ring_setup.ring))
        self._ring = Ring(address, ring_setup.ring)
        self._ring.orphan_callback = self._keep_orphaned_data
        self._ring.pool_size = zc_pool_size
        self._ring.pinned_limit = zc_pinned_limit
        self._ring.stream_pinned_limit = zc_transport_pinned_limit
        self._ring.zc_pin_budget = _memlock_budget()
        if zerocopy != "never":
            self._ring.zc_supported = features.send_zc and features.send_zc_report_usage
        self._multishot_accept = features.multishot_accept
        if recv_multishot is None:
            recv_multishot = os.environ.get("URINGLOOP_RECV_MULTISHOT", "1") != "0"
        self._ring.recv_multishot = bool(recv_multishot) and features.recv_multishot
        self._acceptors: dict[int, int | None] = {}
        # listening sockets this loop created itself (create_server without sock=)
        self._own_listeners: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._child_pidfds: dict[int, int] = {}  # pid -> pidfd, children being waited for
        self._splice_pipes = SplicePipes()
        self._splice_stats = {
            "sendfile_calls": 0,
            "sendfile_spliced_bytes": 0,
            "forward_calls": 0,
            "forward_spliced_bytes": 0,
            "forward_copied_bytes": 0,
        }
        self._recv_backlog: dict[int, _RecvBacklog] = {}  # fd -> cancelled receives
        self._attach_ring(self._ring)
        try:
            super().__init__(selector=RingSelector(self._ring))
        except BaseException:
            # (the self-pipe may be made and not registered: no request refers to it)
            for sock in (getattr(self, "_ssock", None), getattr(self, "_csock", None)):
                if sock is not None:
                    sock.close()
            self._close_ring()
            self._closed = True  # BaseEventLoop.__del__ then has nothing to close
            raise

    # ------------------------------------------------------------ the scheduler's Python parts
    # (LoopCore, native/sched.c, calls these only off the fast path)

    if hasattr(base_events.BaseEventLoop, "_run_forever_setup"):  # 3.13+

        def run_forever(self) -> None:
            """Run until stop() is called."""
            if self._run_once_replaced():
                return super().run_forever()
            # (setup outside the try: a loop that is closed or already running must
            # not be cleaned up by the failed call; CPython gh-130145)
            self._run_forever_setup()
            try:
                self._run_until_stopped()
            finally:
                self._run_forever_cleanup()

    else:

        def run_forever(self) -> None:
            """Run until stop() is called."""
            # BaseEventLoop.run_forever of 3.10-3.12, with its inner loop in C
            if self._run_once_replaced():
                return super().run_forever()
            self._check_closed()
            self._check_running()
            self._set_coroutine_origin_tracking(self._debug)
            old_agen_hooks = sys.get_asyncgen_hooks()
            try:
                self._thread_id = threading.get_ident()
                sys.set_asyncgen_hooks(
                    firstiter=self._asyncgen_firstiter_hook,
                    finalizer=self._asyncgen_finalizer_hook,
                )
                events._set_running_loop(self)
                self._run_until_stopped()
            finally:
                self._stopping = False
                self._thread_id = None
                events._set_running_loop(None)
                self._set_coroutine_origin_tracking(False)
                sys.set_asyncgen_hooks(*old_agen_hooks)

    def _run_once_replaced(self) -> bool:
        """Whether a subclass or the instance replaced _run_once: then asyncio's
        run_forever calls it, as it would on asyncio's loop."""
        return type(self)._run_once is not LoopCore._run_once or "_run_once" in self.__dict__

    def _ring_events(self, fired: list[tuple[int, int]]) -> None:
        """Polls of add_reader/add_writer fds that fired in this iteration's wait."""
        self._process_events(self._selector.fired_keys(fired))

    def _handle_raised(self, handle: events.Handle, exc: BaseException) -> None:
        """A callback raised: what Handle._run does with it."""
        cb = format_helpers._format_callback_source(handle._callback, handle._args)
        context = {"message": f"Exception in callback {cb}", "exception": exc, "handle": handle}
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def _run_handle_debug(self, handle: events.Handle) -> None:
        """Debug mode: run a handle as BaseEventLoop._run_once does, timed."""
        try:
            self._current_handle = handle
            t0 = self.time()
            handle._run()
            dt = self.time() - t0
            if dt >= self.slow_callback_duration:
                base_events.logger.warning(
                    "Executing %s took %.3f seconds", base_events._format_handle(handle), dt
                )
        finally:
            self._current_handle = None

    def _call_at_debug(
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> events.TimerHandle:
        """Debug mode's call_at: BaseEventLoop.call_at, onto the native heap."""
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()
        self._check_thread()
        self._check_callback(callback, "call_at")
        timer = events.TimerHandle(when, callback, args, self, context)
        if timer._source_traceback:
            del timer._source_traceback[-1]
        self._scheduled.append(timer)
        timer._scheduled = True
        return timer

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        # Connections whose SEND_ZC memory waits for a peer's ACK would hold the
        # ring's drain for ever: reset them so the kernel releases it now. (Not in a
        # forked child: the connections are the parent's.)
        if not self._ring.forked:
            for transport in [*self._lingering, *list(self._transports.values())]:
                if isinstance(transport, RingStreamTransport):
                    transport._reset_for_loop_close()
        try:
            super().close()
        finally:
            self._close_ring()
            self._splice_pipes.close()
            for pidfd in self._child_pidfds.values():
                os.close(pidfd)
            self._child_pidfds.clear()

    def _close_ring(self) -> None:
        ring, setup = self._ring, self._ring_setup
        if setup is None:
            return
        self._ring_setup = None
        forked = ring.forked
        pinned = ring.close(CLOSE_DRAIN_SECONDS)
        # Closing the ring fd makes the kernel cancel whatever is left; records whose
        # memory it may still touch are kept alive for good rather than freed in use.
        _ring.destroy_ring(setup, forked)
        if pinned:
            _KEPT_ALIVE.append((ring, setup))
            warnings.warn(
                f"uringloop: {pinned} io_uring requests still held buffers when the loop "
                "closed (the ring belongs to another thread, or the kernel did not answer "
                f"within {CLOSE_DRAIN_SECONDS:.0f}s); those buffers are kept for the life of "
                "the process rather than freed while in use",
                ResourceWarning,
                stacklevel=3,
            )

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: Any,
        waiter: Any = None,
        *,
        extra: Any = None,
        server: Any = None,
    ) -> Any:
        if sock_is_stream(sock):
            return RingStreamTransport(self, sock, protocol, waiter, extra, server)
        return super()._make_socket_transport(sock, protocol, waiter, extra=extra, server=server)

    def _make_datagram_transport(  # type: ignore[override]
        self,
        sock: socket.socket,
        protocol: Any,
        address: Any = None,
        waiter: Any = None,
        extra: Any = None,
    ) -> Any:
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            # (netlink, packet, ...: addresses and sizes the native transport does not
            # know; asyncio's readiness transport handles them as it always did)
            return super()._make_datagram_transport(sock, protocol, address, waiter, extra)
        return RingDatagramTransport(self, sock, protocol, address, waiter, extra)

    # ------------------------------------------------------------ servers

    # A listening socket handed in with sock= may be shared with other processes
    # (gunicorn and uvicorn --workers pass every worker the same socket). A multishot
    # ACCEPT waits on it exclusively and stays first in its wait queue, so one worker
    # would get every connection while the others idle. Such sockets are accepted on
    # readiness instead (a plain POLL wakes every worker, the first accept() wins), as
    # on asyncio's loop and uvloop. Sockets this loop bound itself use multishot ACCEPT.

    async def create_server(  # type: ignore[override]
        self, protocol_factory: Any, host: Any = None, *args: Any, **kwargs: Any
    ) -> asyncio.Server:
        start = kwargs.pop("start_serving", True)
        server = await super().create_server(
            protocol_factory, host, *args, start_serving=False, **kwargs
        )
        return await self._serve_own_listeners(server, kwargs.get("sock") is None, start)

    async def create_unix_server(  # type: ignore[override]
        self, protocol_factory: Any, path: Any = None, *args: Any, **kwargs: Any
    ) -> asyncio.Server:
        start = kwargs.pop("start_serving", True)
        server = await super().create_unix_server(
            protocol_factory, path, *args, start_serving=False, **kwargs
        )
        return await self._serve_own_listeners(server, kwargs.get("sock") is None, start)

    async def _serve_own_listeners(
        self, server: asyncio.Server, own: bool, start_serving: bool
    ) -> asyncio.Server:
        if own:
            self._own_listeners.update(server._sockets)  # type: ignore[attr-defined]
        if start_serving:
            try:
                server._start_serving()  # type: ignore[attr-defined]
            except BaseException:
                server.close()  # the caller never gets the server: nobody else would
                raise
            await asyncio.sleep(0)  # as asyncio's create_server: let the accepts arm
        return server

    def _start_serving(  # type: ignore[override]
        self,
        protocol_factory: Any,
        sock: socket.socket,
        sslcontext: Any = None,
        server: Any = None,
        backlog: int = 100,
        *ssl_timeouts: Any,
    ) -> None:
        """Accept with one multishot ACCEPT request per listening socket of our own."""
        if not (self._multishot_accept and sock_is_stream(sock) and sock in self._own_listeners):
            return super()._start_serving(
                protocol_factory, sock, sslcontext, server, backlog, *ssl_timeouts
            )
        fd = sock.fileno()
        # asyncio's add_reader() here captures the current context: every accepted
        # connection's task (protocol factory, connection_made, reads) starts from a
        # copy of it, so a ContextVar set before create_server() is seen by protocols
        context = contextvars.copy_context()

        def accepted(res: int) -> None:
            if res < 0:
                context.run(self._accept_failed, sock, -res, arm)
                return
            conn = socket.socket(sock.family, sock.type, sock.proto, fileno=res)
            conn.setblocking(False)
            coro = self._accept_connection2(
                protocol_factory, conn, {}, sslcontext, server, *ssl_timeouts
            )
            context.run(self.create_task, coro)

        def arm() -> None:
            if sock.fileno() == fd and fd in self._acceptors:
                self._acceptors[fd] = self._ring.accept_multishot(fd, accepted)

        self._acceptors[fd] = None
        arm()

    def _accept_failed(self, sock: socket.socket, err: int, rearm: Any) -> None:
        if err == errno.EMFILE and _descriptor_free(sock):
            # The kernel read RLIMIT_NOFILE when the ACCEPT was prepared; the limit
            # has been raised since (accept() would not fail now): arm it again, and
            # the new request reads the new limit.
            self.call_soon(rearm)
        elif err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # like asyncio: out of resources, try again in a moment
            self.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(err, os.strerror(err)),
                    "socket": sock,
                }
            )
            self.call_later(asyncio.constants.ACCEPT_RETRY_DELAY, rearm)
        elif err not in (errno.ECANCELED, errno.EBADF, errno.EINVAL):
            self.call_soon(rearm)

    def _stop_serving(self, sock: socket.socket) -> None:
        key = self._acceptors.pop(sock.fileno(), None)
        if key is not None:
            self._ring.cancel(key)
            # The pending ACCEPT holds the listening socket open until the kernel
            # processes the cancel; shutdown() stops it listening right now.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            return
        super()._stop_serving(sock)

    def zerocopy_stats(self) -> dict[str, int]:
        """Counters of the write path: SEND_ZC use, copies, memory lent to the kernel now.

        ``zc_sends``, ``zc_bytes``, ``zc_notifications``, ``zc_copied_notifications`` (the
        kernel copied after all), ``copy_fallback_sockets``, ``copy_sends``, ``copy_bytes``,
        ``pinned_buffers``, ``pinned_bytes``, ``fixed_buffer_sends`` (from the registered
        arena), ``registered_pool_bytes`` and ``zerocopy_buffer_bytes`` (handed out by
        `alloc_zerocopy_buffer` and still alive); ``sendfile_calls`` and
        ``sendfile_spliced_bytes`` count file data that `sendfile`/`sock_sendfile` moved
        to sockets inside the kernel; ``forward_calls``, ``forward_spliced_bytes`` (moved
        socket to socket inside the kernel) and ``forward_copied_bytes`` (through user
        space: a copy fallback, bytes received before the forward began, bytes left in
        the pipe when it stopped) count `forward()`.
        """
        return {**self._ring.zerocopy_stats(), **self._splice_stats}

    def alloc_zerocopy_buffer(self, size: int) -> ZeroCopyBuffer:
        """Writable memory of ``size`` bytes that transports send without any copy.

        The buffer comes from an arena registered with the ring, so a write of it goes
        out with fixed-buffer SEND_ZC: the kernel reads it in place. Fill it through
        ``memoryview(buf)``, then ``transport.write(buf)`` or ``loop.sock_sendzc(sock,
        buf)``. From then on it is lent to the kernel: new views of it are read-only
        until ``await buf.released``. Its memory goes back to the pool when the object
        is collected. Where SEND_ZC is unavailable or the route copies anyway, the
        same buffer is sent with a plain send from its memory.
        """
        self._check_closed()
        return self._ring.alloc_zerocopy_buffer(operator.index(size), self)

    def ring_info(self) -> dict[str, Any]:
        """How this loop's ring was set up, and the data plane's counters."""
        s = self._ring_setup
        if s is None:
            raise RuntimeError("Event loop is closed")
        return {
            "setup": s.rung,
            "flags": s.flag_names,
            "features": s.feature_names,
            "sq_entries": s.sq_entries,
            "cq_entries": s.cq_entries,
            "refused": [rung for rung, _ in s.refused],
            "restricted": s.restricted,
            "emulated_kernel": _ring.probe().emulated_kernel,
            **self._ring.stats(),
        }

    # --------------------------------------------------------- socket API

    # A receive that is cancelled while the kernel already has it in hand may still
    # complete with data. That data has left the socket, so it is kept for the next
    # receive on the same socket object (never for a later socket that reuses the fd
    # number), and that receive waits until every such cancelled request is back:
    # otherwise it would wait in the kernel for bytes an older request already took.

    def _recv_backlog_entry(self, sock: socket.socket) -> _RecvBacklog | None:
        entry = self._recv_backlog.get(sock.fileno())
        if entry is not None and entry.sock() is not sock:
            del self._recv_backlog[sock.fileno()]  # a socket that reused the number
            return None
        return entry

    def _recv_given_up(
        self, sock: socket.socket, fut: asyncio.Future, key: int, buf: Any = None
    ) -> None:
        """A sock_recv/sock_recv_into was cancelled: keep what its request brings in."""
        if self._ring.cancel(key):
            # still the kernel's: its final CQE reports to _keep_orphaned_data
            fd = sock.fileno()
            entry = self._recv_backlog_entry(sock)
            if entry is None:
                entry = self._recv_backlog[fd] = _RecvBacklog(sock)
            entry.pending.add(key)
        elif fut.done() and not fut.cancelled() and fut.exception() is None:
            # completed, but the task was cancelled before it could take the result
            result = fut.result()
            if buf is not None:  # sock_recv_into: the bytes are in the caller's buffer
                result = bytes(memoryview(buf).cast("B")[:result])
            self._keep_orphaned_data(sock, result, 0)

    def _keep_orphaned_data(self, sock: socket.socket, data: bytes, key: int) -> None:
        fd = sock.fileno()
        if fd < 0:
            return  # the socket is closed: nobody can read this data any more
        entry = self._recv_backlog_entry(sock)
        if entry is None:
            if not data:
                return
            entry = self._recv_backlog[fd] = _RecvBacklog(sock)
        if isinstance(data, tuple):
            entry.datagrams.append(data)  # (bytes, address): a whole datagram
        else:
            entry.data += data
        entry.pending.discard(key)
        if not entry.pending:
            if entry.drained is not None and not entry.drained.done():
                entry.drained.set_result(None)
            if not entry.data and not entry.datagrams:
                del self._recv_backlog[fd]

    async def _backlog_settled(self, sock: socket.socket) -> _RecvBacklog | None:
        """sock's backlog once no cancelled receive on it is in flight any more."""
        entry = self._recv_backlog_entry(sock)
        if entry is None:
            return None
        while entry.pending:
            if entry.drained is None or entry.drained.done():
                entry.drained = self.create_future()
            await entry.drained
        return entry

    async def _take_backlog(self, sock: socket.socket, n: int) -> bytes | None:
        """Bytes cancelled receives on sock brought in, once none is in flight any more."""
        entry = await self._backlog_settled(sock)
        if entry is None:
            return None
        if not entry.data:
            if not entry.datagrams:
                self._recv_backlog.pop(sock.fileno(), None)
            return None
        chunk = bytes(entry.data[:n])
        del entry.data[:n]
        if not entry.data and not entry.datagrams:
            self._recv_backlog.pop(sock.fileno(), None)
        return chunk

    async def _take_datagram(self, sock: socket.socket) -> tuple[bytes, Any] | None:
        """The oldest datagram a cancelled receive on sock took, once none is in flight."""
        entry = await self._backlog_settled(sock)
        if entry is None:
            return None
        item = entry.datagrams.popleft() if entry.datagrams else None
        if not entry.data and not entry.datagrams:
            self._recv_backlog.pop(sock.fileno(), None)
        return item

    def _check_sock(self, sock: socket.socket) -> None:
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def sock_recv(self, sock: socket.socket, n: int) -> bytes:
        """Receive up to n bytes from sock.

        As on asyncio's loop, data already there is returned at once (one recv(2),
        no suspension); otherwise one IORING_OP_RECV waits for it.
        """
        self._check_sock(sock)
        if self._recv_backlog and (chunk := await self._take_backlog(sock, n)) is not None:
            return chunk
        fd = sock.fileno()
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            pass
        # (only a call that must wait is refused a transport's socket, as on asyncio)
        self._ensure_fd_no_transport(fd)
        fut = self.create_future()
        key = self._ring.recv(fd, n, fut, sock)
        try:
            return await fut
        except asyncio.CancelledError:
            self._recv_given_up(sock, fut, key)
            raise

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        """Receive into buf: at once when data is there, else one IORING_OP_RECV into it."""
        self._check_sock(sock)
        if self._recv_backlog and self._recv_backlog_entry(sock) is not None:
            view = memoryview(buf).cast("B")
            chunk = await self._take_backlog(sock, len(view))
            if chunk is not None:
                view[: len(chunk)] = chunk
                return len(chunk)
        fd = sock.fileno()
        try:
            return sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            pass
        self._ensure_fd_no_transport(fd)
        fut = self.create_future()
        key = self._ring.recv_into(fd, buf, 0, fut, sock)
        try:
            return await fut
        except asyncio.CancelledError:
            self._recv_given_up(sock, fut, key, buf)
            raise

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple[bytes, Any]:
        """Receive one datagram of at most bufsize bytes (the rest of it is discarded).

        As on asyncio's loop, a datagram already there is returned at once; otherwise
        one IORING_OP_RECVMSG waits for it. A receive cancelled after the kernel gave it
        a datagram hands that datagram to the next receive on the socket.
        """
        self._check_sock(sock)
        if self._recv_backlog and (item := await self._take_datagram(sock)) is not None:
            return item[0][:bufsize], item[1]
        fd = sock.fileno()
        try:
            return sock.recvfrom(bufsize)
        except (BlockingIOError, InterruptedError):
            pass
        self._ensure_fd_no_transport(fd)
        fut = self.create_future()
        key = self._ring.recvfrom(fd, bufsize, fut, sock)
        try:
            return await fut
        except asyncio.CancelledError:
            self._datagram_given_up(sock, fut, key)
            raise

    async def sock_recvfrom_into(
        self, sock: socket.socket, buf: Any, nbytes: int = 0
    ) -> tuple[int, Any]:
        """Receive one datagram into buf (at most nbytes of it): (size, address)."""
        self._check_sock(sock)
        if not nbytes:
            nbytes = len(buf)
        if self._recv_backlog and self._recv_backlog_entry(sock) is not None:
            view = memoryview(buf).cast("B")
            if nbytes > len(view):
                raise ValueError("nbytes is greater than the length of the buffer")
            item = await self._take_datagram(sock)
            if item is not None:
                chunk = item[0][:nbytes]
                view[: len(chunk)] = chunk
                return len(chunk), item[1]
        fd = sock.fileno()
        try:
            return sock.recvfrom_into(buf, nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        self._ensure_fd_no_transport(fd)
        fut = self.create_future()
        key = self._ring.recvfrom_into(fd, buf, nbytes, fut, sock)
        try:
            return await fut
        except asyncio.CancelledError:
            self._datagram_given_up(sock, fut, key, buf)
            raise

    def _datagram_given_up(
        self, sock: socket.socket, fut: asyncio.Future, key: int, buf: Any = None
    ) -> None:
        """A sock_recvfrom/_into was cancelled: keep the datagram its request takes."""
        if self._ring.cancel(key):
            entry = self._recv_backlog_entry(sock)
            if entry is None:
                entry = self._recv_backlog[sock.fileno()] = _RecvBacklog(sock)
            entry.pending.add(key)
        elif fut.done() and not fut.cancelled() and fut.exception() is None:
            # completed, but the task was cancelled before it could take the result
            first, addr = fut.result()
            if buf is not None:  # recvfrom_into: the bytes are in the caller's buffer
                first = bytes(memoryview(buf).cast("B")[:first])
            self._keep_orphaned_data(sock, (first, addr), 0)

    async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
        """Send one datagram to address: at once, as asyncio does, or once the socket
        has room, which a POLL request on the ring says (a datagram is never partly sent).
        """
        self._check_sock(sock)
        fd = sock.fileno()
        while True:
            try:
                return sock.sendto(data, address)
            except (BlockingIOError, InterruptedError):
                pass
            self._ensure_fd_no_transport(fd)
            fut = self.create_future()
            key = self._ring.poll_once(fd, POLLOUT, fut)
            try:
                await fut
            except asyncio.CancelledError:
                self._ring.cancel(key)
                raise
            if sock.fileno() != fd:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        """Send all of data: as much as the socket takes at once (as asyncio), the rest
        with IORING_OP_SEND requests, resubmitted in C after short sends."""
        self._check_sock(sock)
        fd = sock.fileno()
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        view = memoryview(data)
        if sent == view.nbytes:
            return
        # (as on asyncio: what went at once went, even on a transport's socket)
        self._ensure_fd_no_transport(fd)
        fut = self.create_future()
        key = self._ring.sendall(fd, data, fut, sent, sock)
        try:
            await fut
        except asyncio.CancelledError:
            self._ring.cancel(key)
            raise

    async def sock_sendzc(self, sock: socket.socket, data: Any) -> int:
        """Send all of data with SEND_ZC; return the byte count once the kernel released it.

        Each request's memory is lent to the kernel until its notification CQE, so
        data must not be modified before this returns. Without SEND_ZC (kernel or
        ``zerocopy="never"``) the data is sent with a plain send.
        """
        self._check_sock(sock)
        # A ZeroCopyBuffer goes to the ring as itself: it is lent, and from the arena
        # it is sent from the fixed buffer. Anything else is held through a view.
        if isinstance(data, ZeroCopyBuffer):
            payload = data
        else:
            payload = memoryview(data)
            if not payload.c_contiguous:  # (what sock.send() raises; cast() says TypeError)
                raise BufferError("memoryview: underlying buffer is not C-contiguous")
            payload = payload.cast("B")
        size = len(payload)
        if not self._ring.zc_supported or sock.family == socket.AF_UNIX:
            await self.sock_sendall(sock, payload)
            return size
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        sent = 0
        while sent < size:
            if sock.fileno() != fd:  # closed meanwhile: the number may name another file
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            fut = self.create_future()
            key = self._ring.send_zc(fd, payload, fut, sent)
            try:
                n = await fut
            except asyncio.CancelledError:
                self._ring.cancel(key)
                raise
            except BlockingIOError:
                # a spurious EAGAIN (native/dataplane.h, rule 6): nothing went; the next
                # request tries, then waits for room in the kernel
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOMEM, errno.EOPNOTSUPP):
                    raise
                # RLIMIT_MEMLOCK caps memory pinned for SEND_ZC (ENOMEM), or this
                # socket refuses it: nothing of this request went out, copy the rest.
                await self.sock_sendall(sock, memoryview(payload)[sent:])
                return size
            sent += n
        return sent

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        """Connect sock, waiting for the handshake with a POLL request on the ring.

        The connect itself is the non-blocking syscall made right here, as asyncio
        does, not an IORING_OP_CONNECT: that would only start at the loop's next
        submit, and code that accepts on a blocking listener right after one
        ``await asyncio.sleep(0)`` relies on the SYN having left at call time.
        """
        self._check_sock(sock)
        if sock.family == socket.AF_INET or (
            base_events._HAS_IPv6 and sock.family == socket.AF_INET6
        ):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            _, _, _, _, address = resolved[0]
        err = sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            fut = self.create_future()
            key = self._ring.poll_once(sock.fileno(), POLLOUT, fut)
            try:
                await fut
            except asyncio.CancelledError:
                self._ring.cancel(key)
                raise
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Connect call failed {address}")

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        """Accept one connection: at once when one is waiting (one accept(2), as on
        asyncio's loop, which also honours a socket's timeout), else IORING_OP_ACCEPT."""
        self._check_sock(sock)
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            pass
        else:
            conn.setblocking(False)
            return conn, address
        self._ensure_fd_no_transport(sock.fileno())
        fut = self.create_future()
        key = self._ring.accept(sock.fileno(), fut, sock)
        try:
            fd, address = await fut
        except asyncio.CancelledError:
            self._ring.cancel(key)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                os.close(fut.result()[0])
            raise
        conn = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
        conn.setblocking(False)
        return conn, address

    # ------------------------------------------------------------ sendfile

    async def _sock_sendfile_native(
        self, sock: socket.socket, file: Any, offset: int, count: int | None
    ) -> int:
        """Splice the file into the socket inside the kernel (IORING_OP_SPLICE).

        Raises SendfileNotAvailableError, which makes asyncio fall back to reading
        and sending, for anything but a regular file, or when the first splice fails.
        """
        self._ensure_fd_no_transport(sock.fileno())
        return await self._splice_sendfile(sock, file, offset, count)

    async def _splice_sendfile(
        self,
        sock: socket.socket,
        file: Any,
        offset: int,
        count: int | None,
        stopped: Callable[[], bool] | None = None,
    ) -> int:
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        try:
            st = os.fstat(fileno)
        except OSError:
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        if not stat.S_ISREG(st.st_mode):
            raise exceptions.SendfileNotAvailableError("not a regular file")
        if not count:
            # to the end of the file as it is now (os.sendfile would follow a growing
            # file, but each chunk would then need one more splice to find the end)
            count = st.st_size - offset
            if count <= 0:
                return 0
        self._splice_stats["sendfile_calls"] += 1
        sent = 0
        try:
            sent, exc = await splice_file_to_socket(
                self,
                self._ring,
                self._splice_pipes,
                sock.fileno(),
                fileno,
                offset,
                count,
                stopped,
            )
        finally:
            if sent:
                os.lseek(fileno, offset + sent, os.SEEK_SET)
                self._splice_stats["sendfile_spliced_bytes"] += sent
        if exc is not None:
            if sent == 0:
                # like asyncio: a first failure lets the read-and-send fallback decide
                raise exceptions.SendfileNotAvailableError(
                    f"splice failed: {exc.strerror}"
                ) from exc
            if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                raise ConnectionError(errno.ENOTCONN, "socket is not connected") from exc
            raise exc
        return sent

    async def _sendfile_native(self, transp: Any, file: Any, offset: int, count: int | None) -> int:
        if not isinstance(transp, RingStreamTransport):
            return await super()._sendfile_native(transp, file, offset, count)
        self._check_sendfile_params(transp._sock, file, offset, count)
        # As in asyncio, reading pauses meanwhile: a peer that hangs up shows as the
        # sendfile's own ConnectionError, and the transport learns of it afterwards.
        resume_reading = transp.is_reading()
        transp.pause_reading()
        try:
            # What the transport already queued goes first; write() refuses until the end.
            await transp._make_empty_waiter()
            if transp._sock is None or transp._conn_lost:
                raise ConnectionResetError(errno.ECONNRESET, "Connection lost")
            return await self._splice_sendfile(
                transp._sock, file, offset, count, lambda: bool(transp._conn_lost)
            )
        finally:
            transp._reset_empty_waiter()
            if resume_reading:
                transp.resume_reading()

    # ------------------------------------------------------------ forwarding

    async def forward(
        self,
        src: asyncio.Transport,
        dst: asyncio.Transport,
        *,
        write_eof: bool = True,
        pipe_size: int | None = None,
        splice: bool = True,
    ) -> int:
        """Move the bytes src receives to dst inside the kernel, until src's EOF.

        Returns how many bytes reached dst. Both are stream transports of this loop
        (TCP or Unix), not TLS (TypeError: TLS bytes must be decrypted in user space).
        The bytes go socket -> pipe -> socket with IORING_OP_SPLICE, never through the
        process; the two directions of a proxy are two concurrent calls.

        - Meanwhile src's protocol gets no data (reading is paused; its own
          pause_reading()/resume_reading() take effect at the end) and dst.write()
          raises RuntimeError. Bytes src had received but not yet delivered go to dst
          first, after everything dst had queued.
        - Back-pressure: the pipe (``pipe_size`` bytes, default 256 KiB, less where
          the system's pipe limits say so) is the only buffer; while it is full,
          nothing is read from src.
        - At src's EOF the pipe is emptied, then ``dst.write_eof()`` is called unless
          ``write_eof`` is false. src's protocol hears the EOF itself once reading
          resumes (a protocol whose eof_received() returns a false value closes src,
          as it would have without the forward).
        - Errors: src's (a reset) is raised after the pipe's bytes reached dst; dst's
          is raised at once. close() or abort() of either transport ends the forward
          with ConnectionResetError. On those and on cancellation, the requests in
          flight are waited for, and bytes left in the pipe are written to dst while
          it is open: never lost while both connections are alive.
        - Where splice cannot be used (a kernel without it, sockets that refuse it,
          ``splice=False``), the same semantics hold with a copy through user space.
          `zerocopy_stats()` counts ``forward_spliced_bytes`` and ``forward_copied_bytes``.
        """
        return await _forward.forward(
            self, src, dst, write_eof=write_eof, pipe_size=pipe_size, splice=splice
        )

    # ------------------------------------------------------------ signals

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        """asyncio's, with the wake-up fd set as uvloop sets it: a byte that does not
        fit in the full self-pipe is dropped without a report.

        CPython reports such a byte by calling Py_AddPendingCall from inside its C
        signal handler, which takes the pending-calls lock; a signal that lands on
        the main thread while it holds that lock (running the pending calls) then
        deadlocks the process. A storm of signals faster than the loop drains the
        socket pair does that (tests/test_threads_signals.py). The handler call of a
        dropped byte is lost either way: asyncio runs one per byte it reads.
        """
        super().add_signal_handler(sig, callback, *args)
        signal.set_wakeup_fd(self._csock.fileno(), warn_on_full_buffer=False)

    # ------------------------------------------------------------ subprocesses

    async def _make_subprocess_transport(  # type: ignore[override]
        self,
        protocol: Any,
        args: Any,
        shell: bool,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        bufsize: int,
        extra: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Start the child; its exit is a POLL on its pidfd, on this loop's ring.

        No SIGCHLD handler and no waiter thread: the loop reaps exactly the pid it
        started, when its pidfd turns readable. A child watcher the application set
        itself on the policy (3.11-3.13) is honoured instead.
        """
        if _custom_child_watcher() or not hasattr(os, "pidfd_open"):
            return await super()._make_subprocess_transport(
                protocol, args, shell, stdin, stdout, stderr, bufsize, extra=extra, **kwargs
            )
        waiter = self.create_future()
        transp = unix_events._UnixSubprocessTransport(
            self,
            protocol,
            args,
            shell,
            stdin,
            stdout,
            stderr,
            bufsize,
            waiter=waiter,
            extra=extra,
            **kwargs,
        )
        self._watch_child(transp.get_pid(), transp)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _watch_child(self, pid: int, transp: Any) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            # the kernel refuses pidfds (seccomp, very old kernel): asyncio's waiter thread
            threaded = getattr(unix_events, "ThreadedChildWatcher", None)
            if threaded is None:  # 3.14 kept it private
                threaded = unix_events._ThreadedChildWatcher
            watcher = threaded()
            watcher.add_child_handler(pid, self._child_watcher_callback, transp)
            return
        self._child_pidfds[pid] = pidfd
        self._poll_child(pid, pidfd, transp)

    def _poll_child(self, pid: int, pidfd: int, transp: Any) -> None:
        fut = self.create_future()
        self._ring.poll_once(pidfd, POLLIN, fut)
        fut.add_done_callback(lambda f: self._child_exited(f, pid, pidfd, transp))

    def _child_exited(self, fut: asyncio.Future, pid: int, pidfd: int, transp: Any) -> None:
        if self._child_pidfds.get(pid) != pidfd:
            return  # the loop closed meanwhile
        if fut.exception() is not None:
            return  # cancelled by loop.close()
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # someone else reaped it (a SIGCHLD handler calling waitpid(-1))
            logger.warning(
                "child process pid %d exit status already read: will report returncode 255", pid
            )
            returncode = 255
        else:
            if wpid == 0:
                self._poll_child(pid, pidfd, transp)
                return
            returncode = os.waitstatus_to_exitcode(status)
        del self._child_pidfds[pid]
        os.close(pidfd)
        if self._debug:
            logger.debug("process %s exited with returncode %s", pid, returncode)
        transp._process_exited(returncode)


def _custom_child_watcher() -> bool:
    """Did the application set a child watcher of its own on the policy?"""
    policy = events._event_loop_policy
    watcher = getattr(policy, "_watcher", None)
    if watcher is None:
        return False
    defaults = tuple(
        cls
        for cls in (
            getattr(unix_events, "ThreadedChildWatcher", None),
            getattr(unix_events, "PidfdChildWatcher", None),
        )
        if cls is not None
    )
    return not isinstance(watcher, defaults)
