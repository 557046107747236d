"""Loop-internal micro-benchmarks: call_soon, task switches, timers. Prints one JSON line.

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


async def all_benchmarks(scale: float) -> dict[str, float]:
    return {
        "call_soon_per_s": await call_soon_chain(int(300_000 * scale)),
        "task_switches_per_s": await task_switches(int(200_000 * scale)),
        "timers_per_s": await timers(int(100_000 * scale)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop", choices=LOOPS, required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    print(json.dumps(run(args.loop, all_benchmarks(args.scale))))


if __name__ == "__main__":
    main()
