"""redis-py's asyncio client against a real Redis server, on uringloop, asyncio's loop and uvloop.

The module starts Debian's /usr/bin/redis-server (no persistence, in the foreground) on a
free port of 127.0.0.1 and on a Unix socket in a private temporary directory. Each test
runs one scenario to completion on a fresh loop of each kind, once with each of redis-py's
response parsers (hiredis, the pure-Python RESP3 parser, and the pure-Python RESP2 parser
with protocol 2), checks every result against what it must be and against asyncio's loop
with the same parser, and checks that each uringloop loop left nothing in its ring after
close(). Every scenario is bounded (20 s per loop and parser); the sizes are issue 17's
(values up to 1 MiB, 10,000 pipelined commands, 5,000 published messages, 200 tasks on
20 connections), and the module runs in about 20 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import traceback

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from conftest import free_port, log_tail, same
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser, _AsyncRESP3Parser
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff, NoBackoff
from redis.utils import HIREDIS_AVAILABLE

import uringloop

try:
    import uvloop
except ImportError:  # uvloop has no wheel for this interpreter
    uvloop = None

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_PACKAGE = "redis-server"


@dataclasses.dataclass
class RedisServer:
    root: str
    port: int
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def unixsocket(self) -> str:
        return os.path.join(self.root, "redis.sock")

    @property
    def log(self) -> str:
        return os.path.join(self.root, "redis.log")

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log, lines)

    def start(self) -> None:
        """Starts the server (again, on the same port and socket) and waits until PING
        answers on both."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--unixsocket", self.unixsocket, "--unixsocketperm", "700"]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        args += ["--dir", self.root]
        # its log on stdout (no --logfile), and nothing inherited: a server left behind must
        # not hold the pipes of whoever runs pytest
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.answers(socket.AF_INET, ("127.0.0.1", self.port)) and self.answers(
                socket.AF_UNIX, self.unixsocket
            ):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"redis-server did not answer PING:\n{self.log_tail()}")
            time.sleep(0.02)

    @staticmethod
    def answers(family: int, address) -> bool:
        try:
            with socket.socket(family) as s:
                s.settimeout(2)
                s.connect(address)
                s.sendall(b"PING\r\n")
                return s.recv(64) == b"+PONG\r\n"
        except OSError:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would; returns once the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def server():
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.fail(
            f"{REDIS_SERVER} is missing: install the Debian package {REDIS_PACKAGE} "
            f"(apt-get install {REDIS_PACKAGE})",
            pytrace=False,
        )
    assert HIREDIS_AVAILABLE, "redis-py does not see hiredis >= 3.2 (pyproject's test extra)"
    root = tempfile.mkdtemp(prefix="uringloop-redis-", dir="/tmp")  # short: Unix socket path
    os.chmod(root, 0o700)
    srv = RedisServer(root=root, port=free_port())
    try:
        srv.start()
        yield srv
    finally:
        try:
            srv.stop()
        finally:
            shutil.rmtree(root)


LOOPS = {"asyncio": asyncio.SelectorEventLoop, "uringloop": uringloop.new_event_loop}
if uvloop is not None:
    LOOPS["uvloop"] = uvloop.new_event_loop

# parser_class and protocol for each of redis-py's response parsers
PARSERS = {
    "hiredis": {"parser_class": _AsyncHiredisParser},
    "python": {"parser_class": _AsyncRESP3Parser, "protocol": 3},
    "python-resp2": {"parser_class": _AsyncRESP2Parser, "protocol": 2},
}


def on_each_loop(server: RedisServer, scenario, *, timeout: float = 20.0) -> dict:
    """scenario(server, parser options) on a fresh loop of each kind with each parser:
    {(loop name, parser name): result}.

    Every combination runs even when one fails; failures (including a uringloop ring that
    still holds something after close()) are reported together. Results must equal
    asyncio's loop's with the same parser.
    """
    results, failures = {}, {}
    for parser, options in PARSERS.items():
        for name, factory in LOOPS.items():
            if not server.running():  # a failed restart test must not take the rest along
                server.start()
            loop = factory()
            try:
                results[name, parser] = loop.run_until_complete(
                    asyncio.wait_for(scenario(server, options), timeout)
                )
            except Exception as exc:
                failures[f"{name}/{parser}"] = "".join(traceback.format_exception(exc))
            finally:
                left = asyncio.all_tasks(loop)  # only after a failure
                for task in left:
                    task.cancel()
                if left:
                    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()
            if isinstance(loop, uringloop.UringEventLoop):
                stats, zc = loop._ring.stats(), loop._ring.zerocopy_stats()
                if stats["inflight"] or stats["records"] or zc["pinned_buffers"]:
                    failures[f"{name}/{parser} ring after close"] = f"{stats}\n{zc}"
    if failures:
        raise AssertionError("\n".join(f"--- {name}:\n{text}" for name, text in failures.items()))
    for (name, parser), result in results.items():
        assert result == results["asyncio", parser], f"{name}/{parser} differs from asyncio's"
    return results


def tcp(server: RedisServer, options: dict, **kwargs) -> aioredis.Redis:
    """A client that owns its pool (redis.asyncio.Redis() takes no parser_class)."""
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=server.port, **options, **kwargs)
    return aioredis.Redis.from_pool(pool)


def unix(server: RedisServer, options: dict, **kwargs) -> aioredis.Redis:
    pool = aioredis.ConnectionPool(
        connection_class=aioredis.UnixDomainSocketConnection,
        path=server.unixsocket,
        **options,
        **kwargs,
    )
    return aioredis.Redis.from_pool(pool)


async def parser_in_use(r: aioredis.Redis) -> str:
    conn = await r.connection_pool.get_connection()
    try:
        return type(conn._parser).__name__
    finally:
        await r.connection_pool.release(conn)


async def blocked_clients(r: aioredis.Redis) -> int:
    return (await r.info("clients"))["blocked_clients"]


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    """Polls an async predicate (the server's view of things) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- GET/SET, 1 byte to 1 MiB, TCP and Unix socket --------------------------------------

SIZES = [1, 2, 100, 1023, 1024, 4095, 4096, 4097, 32767, 32768, 32769, 65536, 100_000]
SIZES += [(1 << 20) - 1, 1 << 20]
# every byte value, CR and LF included (RESP frames bulk strings by length, not by content)
VALUES = {n: random.Random(n).randbytes(n) for n in SIZES}
VALUES[3] = b"\r\n\x00"


async def get_set(server: RedisServer, options: dict) -> dict:
    out = {}
    for kind, connect in (("tcp", tcp), ("unix", unix)):
        r = connect(server, options)
        try:
            assert await parser_in_use(r) == options["parser_class"].__name__
            await r.flushall()
            for n, value in VALUES.items():
                key = f"{kind}:{n}"
                assert await r.set(key, value) is True
                assert same(await r.get(key), value)
                assert await r.strlen(key) == len(value)
            # all at once, on up to 15 connections of the pool, read back in one MGET
            await asyncio.gather(*(r.set(f"{kind}:many:{n}", v) for n, v in VALUES.items()))
            got = await r.mget([f"{kind}:many:{n}" for n in VALUES])
            for value, back in zip(VALUES.values(), got, strict=True):
                assert same(back, value)
            assert await r.get(f"{kind}:absent") is None
            out[kind] = sorted(int(k.split(b":")[-1]) for k in await r.keys(f"{kind}:many:*"))
        finally:
            await r.aclose()
    return out


def test_get_set_one_byte_to_one_mib_over_tcp_and_unix_socket(server):
    results = on_each_loop(server, get_set)
    assert results["asyncio", "hiredis"] == {"tcp": sorted(VALUES), "unix": sorted(VALUES)}


# --- a pipeline of 10,000 commands ------------------------------------------------------


async def pipeline(server: RedisServer, options: dict) -> list:
    r = tcp(server, options)
    try:
        await r.flushall()
        expected = []
        async with r.pipeline(transaction=False) as pipe:
            for i in range(2000):
                pipe.set(f"k{i}", f"v{i}" * (i % 50))
                pipe.get(f"k{i}")
                pipe.incr("counter")
                pipe.rpush("list", i)
                pipe.incrby(f"k{i}" if i % 500 == 7 else "other", 2)
                expected += [True, f"v{i}".encode() * (i % 50), i + 1, i + 1]
                expected.append("error" if i % 500 == 7 else 2 * (i + 1 - (i + 493) // 500))
            assert len(pipe) == 10_000
            got = await pipe.execute(raise_on_error=False)
        assert len(got) == 10_000
        # INCRBY on a string is the server's error, in its place among the replies
        got = ["error" if isinstance(g, redis.exceptions.ResponseError) else g for g in got]
        assert got == expected
        assert await r.lrange("list", 0, -1) == [str(i).encode() for i in range(2000)]
        async with r.pipeline(transaction=True) as tx:  # MULTI ... EXEC
            for _ in range(1000):
                tx.incr("tx")
            assert await tx.execute() == list(range(1, 1001))
        return got
    finally:
        await r.aclose()


def test_pipeline_of_ten_thousand_commands(server):
    on_each_loop(server, pipeline)


# --- pub/sub: 100 channels, pattern subscriptions, 5,000 messages ------------------------

CHANNELS = [f"ch.{i:03d}" for i in range(100)]
PATTERNS = ["ch.00?", "ch.*5", "ch.09*"]  # ch.005 and ch.095 match two of them
ROUNDS = 50  # messages per channel


def matching(channel: str) -> list[str]:
    import fnmatch

    return [p for p in PATTERNS if fnmatch.fnmatchcase(channel, p)]


async def pubsub(server: RedisServer, options: dict) -> dict:
    sub, pub = tcp(server, options), unix(server, options)
    p = sub.pubsub()
    try:
        await p.subscribe(*CHANNELS)
        await p.psubscribe(*PATTERNS)
        confirmations = []
        for _ in range(len(CHANNELS) + len(PATTERNS)):
            m = await p.get_message(timeout=10)
            assert m is not None, "a subscription was not confirmed"
            confirmations.append((m["type"], m["channel"], m["data"]))
        assert confirmations[-1] == ("psubscribe", PATTERNS[-1].encode(), 103)
        expected_total = ROUNDS * sum(1 + len(matching(c)) for c in CHANNELS)
        received: dict[tuple, list[bytes]] = {}

        async def receive() -> None:
            for _ in range(expected_total):
                m = await p.get_message(timeout=10)
                assert m is not None, f"only {sum(map(len, received.values()))} messages came"
                received.setdefault((m["type"], m["pattern"], m["channel"]), []).append(m["data"])

        receiver = asyncio.ensure_future(receive())
        receivers = []
        for rnd in range(ROUNDS):
            async with pub.pipeline(transaction=False) as pipe:
                for channel in CHANNELS:
                    pipe.publish(channel, f"{channel}#{rnd}")
                receivers += await pipe.execute()
        assert receivers == [1 + len(matching(c)) for c in CHANNELS] * ROUNDS
        await receiver
        assert await p.get_message(timeout=0.05) is None  # nothing twice
        for channel in CHANNELS:
            want = [f"{channel}#{rnd}".encode() for rnd in range(ROUNDS)]
            assert received.pop(("message", None, channel.encode())) == want, channel
            for pattern in matching(channel):
                key = ("pmessage", pattern.encode(), channel.encode())
                assert received.pop(key) == want, key
        assert not received, list(received)[:5]
        await p.unsubscribe()
        await p.punsubscribe()
        ends = [await p.get_message(timeout=10) for _ in range(len(CHANNELS) + len(PATTERNS))]
        assert sorted(m["type"] for m in ends) == ["punsubscribe"] * 3 + ["unsubscribe"] * 100
        assert await pub.publish(CHANNELS[0], "nobody") == 0
        return {"confirmations": confirmations, "total": expected_total}
    finally:
        await p.aclose()
        await sub.aclose()
        await pub.aclose()


def test_pubsub_hundred_channels_and_patterns_every_message_once_in_order(server):
    results = on_each_loop(server, pubsub)
    assert results["asyncio", "hiredis"]["total"] == ROUNDS * (100 + 10 + 10 + 10)


# --- a blocking command cancelled -------------------------------------------------------


async def cancelled_blpop(server: RedisServer, options: dict) -> dict:
    loop = asyncio.get_running_loop()
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=server.port, max_connections=2, **options)
    r = aioredis.Redis(connection_pool=pool)
    watcher = unix(server, options)
    out = {}
    try:
        await r.flushall()
        for how in ("task.cancel", "asyncio.timeout"):
            started = loop.time()
            if how == "task.cancel":
                blocked = asyncio.ensure_future(r.blpop(["queue"], 0))
            else:
                blocked = asyncio.ensure_future(blpop_within(r, 0.3))
            await until(lambda: _blocked_is(watcher, 1), "the server to see BLPOP blocked")
            if how == "task.cancel":
                blocked.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await blocked
            else:
                with pytest.raises(TimeoutError):
                    await blocked
            # a hang check, not a speed check: socket_timeout (5 s) would end it anyway
            out[how, "prompt"] = loop.time() - started < 2.5
            # the connection that carried BLPOP is dropped, not put back mid-command: the
            # server sees no blocked client, and an element pushed now stays in the list
            await until(lambda: _blocked_is(watcher, 0), "the server to drop the BLPOP")
            assert await r.rpush("queue", how) == 1
            assert await r.lrange("queue", 0, -1) == [how.encode()]
            assert list(await r.blpop(["queue"], 0)) == [b"queue", how.encode()]  # RESP2: a tuple
            assert await r.set("after", how) and await r.get("after") == how.encode()
            out[how, "pool"] = len(pool._available_connections) + len(pool._in_use_connections)
        return out
    finally:
        await r.aclose()
        await pool.aclose()
        await watcher.aclose()


async def _blocked_is(r: aioredis.Redis, n: int) -> bool:
    return await blocked_clients(r) == n


async def blpop_within(r: aioredis.Redis, seconds: float):
    if hasattr(asyncio, "timeout"):  # 3.11+
        async with asyncio.timeout(seconds):
            return await r.blpop(["queue"], 0)
    try:
        return await asyncio.wait_for(r.blpop(["queue"], 0), seconds)
    except asyncio.TimeoutError as exc:
        raise TimeoutError from exc


def test_blocking_command_cancelled_promptly_and_pool_still_usable(server):
    results = on_each_loop(server, cancelled_blpop)
    assert all(v is True for k, v in results["asyncio", "hiredis"].items() if k[1] == "prompt")


# --- a pool of 20 connections under 200 concurrent tasks --------------------------------


async def pool_under_load(server: RedisServer, options: dict) -> dict:
    name = f"pool-{os.urandom(4).hex()}"  # this run's connections, not earlier runs'
    pool = aioredis.BlockingConnectionPool(
        host="127.0.0.1",
        port=server.port,
        max_connections=20,
        timeout=20,
        client_name=name,
        **options,
    )
    r = aioredis.Redis(connection_pool=pool)
    watcher = unix(server, options)
    peak = 0
    try:
        await r.flushall()
        client_ids: set[int] = set()

        async def task(i: int) -> bytes:
            nonlocal peak
            value = random.Random(i).randbytes(100 + i * 37)
            for round_ in range(5):
                client_ids.add(await r.client_id())
                await r.set(f"t{i}", value + bytes([round_]))
                await r.incr("counter")
                assert await r.get(f"t{i}") == value + bytes([round_])
                peak = max(peak, len(pool._in_use_connections))
            async with r.pipeline(transaction=True) as tx:
                tx.incr("counter").lpush("order", i).llen("order")
                _, _, length = await tx.execute()
            return length

        lengths = await asyncio.gather(*(task(i) for i in range(200)))
        assert sorted(lengths) == list(range(1, 201))
        assert await r.get("counter") == b"1200"
        connected = len([c for c in await watcher.client_list() if c["name"] == name])
        created = len(pool._available_connections) + len(pool._in_use_connections)
        assert 2 <= len(client_ids) <= 20 and created <= 20 and connected <= 20
        assert peak <= 20
        return {"created": created, "distinct": len(client_ids), "connected": connected}
    finally:
        await r.aclose()
        await pool.aclose()
        await watcher.aclose()


def test_pool_of_twenty_under_two_hundred_tasks(server):
    on_each_loop(server, pool_under_load)


# --- the server killed and started again ------------------------------------------------

CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


async def server_restart(server: RedisServer, options: dict) -> dict:
    loop = asyncio.get_running_loop()
    # no retries: every failure shows; a patient client rides the restart out with retries
    r = tcp(server, options, retry=Retry(NoBackoff(), 0))
    u = unix(server, options, retry=Retry(NoBackoff(), 0))
    patient = tcp(server, options, retry=Retry(ConstantBackoff(0.02), 500))
    out: dict = {}
    try:
        await r.flushall()
        assert await r.set("k", "before") and await u.get("k") == b"before"
        assert await patient.ping()
        blocked = asyncio.ensure_future(r.blpop(["queue"], 0))

        async def pipeline_ending_blocked():
            async with u.pipeline(transaction=False) as pipe:
                for i in range(2000):
                    pipe.set(f"p{i}", "x" * 1000)
                pipe.blpop(["queue2"], 0)
                return await pipe.execute()

        # its first 2,000 replies have come when the server dies in the middle of it
        piped = asyncio.ensure_future(pipeline_ending_blocked())
        await until(lambda: _blocked_is(u, 2), "the server to see both BLPOPs blocked")

        server.kill()
        started = loop.time()
        with pytest.raises(CONNECTION_ERRORS) as caught:
            await blocked
        out["in flight"] = type(caught.value).__name__
        with pytest.raises(CONNECTION_ERRORS) as caught:
            await piped
        out["pipeline in flight"] = type(caught.value).__name__
        for client, name in ((r, "tcp"), (u, "unix")):
            for attempt in range(3):  # the pooled connection, then new ones, all refused
                with pytest.raises(CONNECTION_ERRORS) as caught:
                    await client.get("k")
                out[name, attempt] = type(caught.value).__name__
        out["no hang"] = loop.time() - started < 5  # socket_timeout would be 5 s each

        # a command sent while the server is down, retried until it is back
        retried = asyncio.ensure_future(patient.incr("n"))
        await asyncio.sleep(0.1)
        assert not retried.done()
        await asyncio.to_thread(server.start)
        assert await asyncio.wait_for(retried, 10) == 1

        # without retries, the next command after the restart works on a new connection
        assert await r.get("k") is None  # nothing was saved
        assert await r.set("k", "after") and await u.get("k") == b"after"
        assert await r.incr("n") == 2 and await u.incr("n") == 3
        assert await r.blpop(["nothing"], 0.05) is None
        return out
    finally:
        await r.aclose()
        await u.aclose()
        await patient.aclose()


def test_server_killed_and_restarted_mid_use(server):
    starts = server.starts
    results = on_each_loop(server, server_restart)
    assert server.starts == starts + len(results)
    assert results["asyncio", "hiredis"]["no hang"] is True
