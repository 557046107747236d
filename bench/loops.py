"""The loops under comparison, by name: every benchmark takes --loop=asyncio|uvloop|uringloop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LOOPS = ("asyncio", "uvloop", "uringloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "asyncio":
        return asyncio.SelectorEventLoop
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "uringloop":
        import uringloop

        return uringloop.new_event_loop
    raise ValueError(f"unknown loop {name!r}; choose from {', '.join(LOOPS)}")


def run(name: str, coro):
    loop = loop_factory(name)()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
