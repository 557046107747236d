"""uringloop: a drop-in asyncio event loop on Linux io_uring.

Use it with ``asyncio.run(main(), loop_factory=uringloop.new_event_loop)`` (3.12+),
``asyncio.Runner(loop_factory=uringloop.new_event_loop)`` (3.11+), ``uringloop.run(main())``
or, for code that relies on the policy, ``uringloop.install()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from ._dataplane import ZeroCopyBuffer
from ._loop import UringEventLoop
from ._ring import Features, UringUnavailableError, probe

__all__ = [
    "EventLoopPolicy",
    "Features",
    "Loop",
    "UringEventLoop",
    "UringUnavailableError",
    "ZeroCopyBuffer",
    "install",
    "new_event_loop",
    "probe",
    "run",
    "sendto_many",
]
__version__ = "0.1.0"

Loop = UringEventLoop
_T = TypeVar("_T")
logger = logging.getLogger("uringloop")


def new_event_loop(
    *,
    setup: str | None = None,
    zerocopy: str | None = None,
    zc_threshold: int | None = None,
    recv_multishot: bool | None = None,
    zc_pool_size: int | None = None,
    zc_pinned_limit: int | None = None,
    zc_transport_pinned_limit: int | None = None,
) -> UringEventLoop:
    """Return a new io_uring event loop; raises UringUnavailableError without io_uring.

    The keyword options are those of `UringEventLoop`; by default each comes from its
    environment variable or the probe.
    """
    return UringEventLoop(
        setup=setup,
        zerocopy=zerocopy,
        zc_threshold=zc_threshold,
        recv_multishot=recv_multishot,
        zc_pool_size=zc_pool_size,
        zc_pinned_limit=zc_pinned_limit,
        zc_transport_pinned_limit=zc_transport_pinned_limit,
    )


def sendto_many(transport: asyncio.DatagramTransport, datagrams: Iterable[tuple[Any, Any]]) -> None:
    """Queue a burst of datagrams, ``(data, addr)`` pairs, on a datagram transport.

    On uringloop's datagram transport this is one call into C that queues them all
    for the end of the iteration (``transport.sendto_many``); on any other loop it is
    ``transport.sendto(data, addr)`` for each pair in order, with the same errors.
    ``addr`` is ``None`` for a connected transport.
    """
    native = getattr(transport, "sendto_many", None)
    if native is not None:
        native(datagrams)
        return
    sendto = transport.sendto
    for data, addr in datagrams:
        sendto(data, addr)


def _require_from_env() -> bool:
    return os.environ.get("URINGLOOP_REQUIRE", "").strip().lower() in ("1", "true", "yes", "on")


_fallback_warned = False


def _fallback_loop(exc: UringUnavailableError) -> asyncio.AbstractEventLoop:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        msg = f"uringloop is falling back to asyncio's default event loop: {exc.strerror}"
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
    return asyncio.SelectorEventLoop()


def _policy_base() -> type:
    # The Unix policy keeps the child-watcher methods code written for 3.11 calls.
    from asyncio import unix_events

    for name in ("_UnixDefaultEventLoopPolicy", "_DefaultEventLoopPolicy"):
        base = getattr(unix_events, name, None)
        if base is not None:
            return base
    return asyncio.events.BaseDefaultEventLoopPolicy


class EventLoopPolicy(_policy_base()):  # type: ignore[misc]
    """An event loop policy whose loops are uringloop loops.

    Where io_uring is unavailable it hands out asyncio's default loop instead and
    warns once, unless ``fallback=False`` or ``URINGLOOP_REQUIRE=1``, which make
    `new_event_loop` raise `UringUnavailableError`.
    """

    def __init__(self, *, fallback: bool | None = None) -> None:
        super().__init__()
        self.fallback = (not _require_from_env()) if fallback is None else fallback

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return UringEventLoop()
        except UringUnavailableError as exc:
            if not self.fallback:
                raise
            return _fallback_loop(exc)


def install(*, fallback: bool | None = None) -> None:
    """Make uringloop the loop of asyncio's policy (for asyncio.run() without loop_factory)."""
    asyncio.set_event_loop_policy(EventLoopPolicy(fallback=fallback))


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """Run a coroutine on a new uringloop loop, like asyncio.run()."""

    def loop_factory() -> UringEventLoop:
        try:
            return new_event_loop()
        except BaseException:
            # (io_uring refused: main never starts, and must not be reported as a
            # "coroutine ... was never awaited" on top of the error)
            if asyncio.iscoroutine(main):
                main.close()
            raise

    if sys.version_info >= (3, 12):
        return asyncio.run(main, debug=debug, loop_factory=loop_factory)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=loop_factory) as runner:
            return runner.run(main)
    return _run_310(main, debug, loop_factory)


def _run_310(
    main: Coroutine[Any, Any, _T], debug: bool | None, loop_factory: Callable[[], UringEventLoop]
) -> _T:
    from asyncio.runners import _cancel_all_tasks  # type: ignore[attr-defined]

    if asyncio.events._get_running_loop() is not None:
        raise RuntimeError("uringloop.run() cannot be called from a running event loop")
    if not asyncio.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    loop = loop_factory()
    try:
        asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
