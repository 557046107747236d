"""Loop-internal micro-benchmarks: call_soon, task switches, timers, futures, tasks.

Prints one JSON line. Each figure is a rate (per second) of the scheduler's own work:
nothing here does I/O, so the loop's core is all that is measured.

usage: python -m bench.micro --loop=uringloop [--scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from .loops import LOOPS, run


async def call_soon_chain(n: int) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = n

    def step():
        nonlocal left
        left -= 1
        if left:
            loop.call_soon(step)
        else:
            done.set_result(None)

    t = time.perf_counter()
    loop.call_soon(step)
    await done
    return n / (time.perf_counter() - t)


async def task_switches(n: int) -> float:
    async def worker(k: int):
        for _ in range(k):
            await asyncio.sleep(0)

    t = time.perf_counter()
    await asyncio.gather(*(worker(n // 10) for _ in range(10)))
    return n / (time.perf_counter() - t)


async def timers(n: int) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = n
    rnd = random.Random(1)

    def fire():
        nonlocal left
        left -= 1
        if not left:
            done.set_result(None)

    t = time.perf_counter()
    for _ in range(n):
        loop.call_later(rnd.random() * 0.05, fire)
    await done
    return n / (time.perf_counter() - t)


async def futures_via_call_soon(n: int) -> float:
    """A future resolved from a call_soon callback and awaited, n times in a row."""
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    for _ in range(n):
        fut = loop.create_future()
        loop.call_soon(fut.set_result, None)
        await fut
    return n / (time.perf_counter() - t)


async def tasks_gathered(n: int, batch: int = 100) -> float:
    """Tasks created (by create_task) and gathered, in batches of 100."""

    async def leaf() -> None:
        pass

    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    for _ in range(n // batch):
        await asyncio.gather(*[loop.create_task(leaf()) for _ in range(batch)])
    return n / (time.perf_counter() - t)


async def eager_tasks_gathered(n: int) -> float | None:
    """The same with asyncio.eager_task_factory (3.12+): most tasks finish in create_task."""
    factory = getattr(asyncio, "eager_task_factory", None)
    if factory is None:
        return None
    loop = asyncio.get_running_loop()
    old = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        return await tasks_gathered(n)
    except TypeError:  # uvloop 0.23 on 3.13 calls the factory with eager_start=
        return None
    finally:
        loop.set_task_factory(old)


async def all_benchmarks(scale: float) -> dict[str, float]:
    results = {
        "call_soon_per_s": await call_soon_chain(int(300_000 * scale)),
        "task_switches_per_s": await task_switches(int(200_000 * scale)),
        "timers_per_s": await timers(int(100_000 * scale)),
        "futures_per_s": await futures_via_call_soon(int(200_000 * scale)),
        "tasks_per_s": await tasks_gathered(int(100_000 * scale)),
    }
    eager = await eager_tasks_gathered(int(100_000 * scale))
    if eager is not None:
        results["eager_tasks_per_s"] = eager
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop", choices=LOOPS, required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    print(json.dumps(run(args.loop, all_benchmarks(args.scale))))


if __name__ == "__main__":
    main()
