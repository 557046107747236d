"""One client benchmark run: asyncpg or redis-py's asyncio client on one loop, one JSON line out.

usage: python -m bench.db_client --loop=NAME --work=WORK --conns=N --seconds=S --port=P

WORK is one of:
- pg-select:   each of N asyncpg connections sends `SELECT 1` (a prepared statement,
               as asyncpg caches it) and waits for the answer, again and again.
- pg-fetch:    one connection fetches a 10,000-row table (int, text, float) as Records.
- redis-get-set: each of N clients (one connection each) alternates SET and GET of a
               100-byte value; an operation is one command.
- redis-pipeline: one client sends pipelines of 1,000 SETs (no MULTI); an operation is
               one command.

The run warms up for a fifth of S (at least 0.2 s), then counts operations for S seconds
and the process's CPU time (user + system) over the same span, so the numbers are the
client's and its loop's: the servers run in other processes on the other CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

from .loops import loop_factory

FETCH_ROWS = 10_000
PIPELINE = 1_000
VALUE = b"v" * 100


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def timed(workers, seconds: float) -> dict:
    """Runs the workers (each `async def w(stop) -> ops`) through a warm-up, then timed."""
    warm = max(0.2, seconds / 5)
    state = {"stop": False}

    async def span(length: float) -> tuple[int, float, float]:
        state["stop"] = False
        t0, c0 = time.perf_counter(), cpu_now()
        tasks = [asyncio.ensure_future(w(state)) for w in workers]
        await asyncio.sleep(length)
        state["stop"] = True
        ops = sum(await asyncio.gather(*tasks))
        return ops, time.perf_counter() - t0, cpu_now() - c0

    await span(warm)
    ops, wall, cpu = await span(seconds)
    return {
        "ops": ops,
        "seconds": wall,
        "ops_per_s": ops / wall,
        "client_cpu_us_per_op": cpu * 1e6 / max(ops, 1),
    }


async def pg(work: str, conns: int, seconds: float, port: int) -> dict:
    import asyncpg

    params = dict(host="127.0.0.1", port=port, user="bench", database="postgres", ssl=False)
    connections = [await asyncpg.connect(**params) for _ in range(conns)]
    try:
        if work == "pg-select":

            def worker(conn):
                async def run(state) -> int:
                    n = 0
                    while not state["stop"]:
                        assert await conn.fetchval("SELECT 1") == 1
                        n += 1
                    return n

                return run

            workers = [worker(c) for c in connections]
        else:
            conn = connections[0]
            await conn.execute(
                "CREATE TEMP TABLE rows AS SELECT g AS id, 'row number ' || g AS name, "
                f"g * 0.5 AS value FROM generate_series(1, {FETCH_ROWS}) g"
            )

            async def fetch(state) -> int:
                n = 0
                while not state["stop"]:
                    rows = await conn.fetch("SELECT id, name, value FROM rows")
                    assert len(rows) == FETCH_ROWS
                    n += 1
                return n

            workers = [fetch]
        return await timed(workers, seconds)
    finally:
        for c in connections:
            await c.close()


async def redis(work: str, conns: int, seconds: float, port: int) -> dict:
    import redis.asyncio as aioredis

    clients = [
        aioredis.Redis(host="127.0.0.1", port=port, single_connection_client=True)
        for _ in range(conns)
    ]
    try:
        if work == "redis-get-set":

            def worker(r, key: str):
                async def run(state) -> int:
                    n = 0
                    while not state["stop"]:
                        await r.set(key, VALUE)
                        assert await r.get(key) == VALUE
                        n += 2
                    return n

                return run

            workers = [worker(r, f"key:{i}") for i, r in enumerate(clients)]
        else:
            r = clients[0]

            async def pipelines(state) -> int:
                n = 0
                while not state["stop"]:
                    pipe = r.pipeline(transaction=False)
                    for i in range(PIPELINE):
                        pipe.set(f"p:{i}", VALUE)
                    assert len(await pipe.execute()) == PIPELINE
                    n += PIPELINE
                return n

            workers = [pipelines]
        return await timed(workers, seconds)
    finally:
        for r in clients:
            await r.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.db_client")
    ap.add_argument("--loop", required=True)
    ap.add_argument(
        "--work",
        required=True,
        choices=("pg-select", "pg-fetch", "redis-get-set", "redis-pipeline"),
    )
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    run = pg if args.work.startswith("pg-") else redis
    loop = loop_factory(args.loop)()
    try:
        result = loop.run_until_complete(run(args.work, args.conns, args.seconds, args.port))
        result["loop"] = f"{type(loop).__module__}.{type(loop).__name__}"
    finally:
        loop.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
