"""The loops under comparison, by name: every benchmark takes --loop=asyncio|uvloop|rloop|uringloop.

rloop (Rust, on epoll; on PyPI) is the fastest other loop: it belongs in every table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LOOPS = ("asyncio", "uvloop", "rloop", "uringloop")
# variants of uringloop for comparisons inside the project
VARIANTS = ("uringloop-single",)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "asyncio":
        return asyncio.SelectorEventLoop
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "rloop":
        import rloop

        return rloop.new_event_loop
    if name == "uringloop":
        import uringloop

        return uringloop.new_event_loop
    if name == "uringloop-single":
        # single-shot recv per read instead of multishot recv from the buffer ring
        import functools

        import uringloop

        return functools.partial(uringloop.new_event_loop, recv_multishot=False)
    raise ValueError(f"unknown loop {name!r}; choose from {', '.join(LOOPS)}")


def run(name: str, coro):
    loop = loop_factory(name)()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
