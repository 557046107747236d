"""A seeded, randomized state-machine fuzzer for stream transports over real sockets.

    python tests/fuzz_streams.py --seed 1 --count 500          # scenarios 0..499 of seed 1
    python tests/fuzz_streams.py --seed 1 --only 137           # replay one of them
    python tests/fuzz_streams.py --seed 1 --count 200 --loop asyncio   # the same on asyncio

Each scenario connects two stream transports of one loop (TCP or a Unix socket) and
drives them with a random interleaving of what applications do: write()/writelines()
of bytes, bytearray, memoryview and ZeroCopyBuffer from 1 B to 4 MiB, write_eof(),
pause_reading()/resume_reading(), set_protocol() between Protocol and
BufferedProtocol both ways, close(), abort(), a peer reset, sleeps; and protocols
whose callbacks pause, swap the protocol, close, abort, stop the loop or raise. Loop
options vary too (multishot or single-shot receives, SEND_ZC always / auto / never, a
low zero-copy threshold). Some scenarios fork in the middle (the child must not disturb
the parent), some end with loop.close() while everything is open.

After every scenario it checks:
- every byte received is the byte sent at that offset of that direction (no loss,
  duplicate or reordering); where nothing disruptive happened (no close before EOF,
  abort, reset, raise, loop stop, loop close, fault), everything arrives, then EOF;
- each protocol sees connection_made first, data only between it and EOF or
  connection_lost, eof_received at most once, connection_lost exactly once, nothing
  after it;
- after loop.close(): no request in flight, no record, no memory lent to the kernel,
  no socket left open, and loop.close() returned within its bound;
- with --compare, a scenario that is deterministic on every loop (nothing disruptive)
  gives asyncio's loop the same outcome: bytes each way, EOF, connection_lost().

URINGLOOP_FAULTS (read by builds with fault injection, `make test-asan`) makes SQE
allocation, submission or table growth fail every Nth time; then the rule is that
either the bytes arrive or an error reaches connection_lost().

A failing scenario prints its replay command. Exit status: 0 when all passed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import socket
import sys
import tempfile
import time
import traceback
import warnings

from conftest import open_sockets  # (tests/ is this script's directory)

import uringloop
from uringloop import _dataplane

PATTERN = random.Random(20261201).randbytes(1 << 20)
PATTERN2 = PATTERN * 2
SIZES = [1, 3, 100, 1000, 1500, 4096, 16384, 65536, 65537, 200_000, 1 << 20, 4 << 20]
SIZE_WEIGHTS = [8, 4, 8, 8, 4, 6, 6, 4, 2, 2, 1, 0.3]
SANITIZED = bool(os.environ.get("URINGLOOP_EXPECT_SANITIZERS"))
FAULTS = bool(os.environ.get("URINGLOOP_FAULTS"))
CLOSE_BOUND = 2.0 if SANITIZED else 0.5
SCENARIO_TIMEOUT = 60.0 if SANITIZED else 20.0
# A BufferedProtocol whose get_buffer() returns 1 or 100 bytes takes a callback per byte
# (or hundred): a side that keeps such a buffer for megabytes is slow on any loop, not
# stuck. The waits below end when nothing arrives for STALL_TIMEOUT, and at the latest
# after SCENARIO_TIMEOUT_MAX, so that a slow delivery is checked to its end and a stall
# still fails as soon as before.
STALL_TIMEOUT = SCENARIO_TIMEOUT / 2
SCENARIO_TIMEOUT_MAX = 4 * SCENARIO_TIMEOUT


def pattern(direction: int, offset: int, n: int) -> bytes:
    """The n bytes at offset of a direction's stream (0: a->b, 1: b->a)."""
    out = bytearray()
    offset += direction * 7919
    while n:
        i = offset % len(PATTERN)
        k = min(n, len(PATTERN) - i)
        out += PATTERN2[i : i + k]
        offset += k
        n -= k
    return bytes(out)


class ScenarioError(AssertionError):
    pass


class Side:
    """One end: what it wrote and received, what happened to it, what it may do."""

    def __init__(self, sc: Scenario, name: str, direction: int) -> None:
        self.sc, self.name, self.direction = sc, name, direction
        self.transport: asyncio.Transport | None = None
        self.sent = 0  # bytes accepted by write()
        self.received = 0
        self.events: list[str] = []
        self.made = False
        self.eof = False
        self.lost: BaseException | None | str = "not yet"
        self.lost_fut = sc.loop.create_future()
        self.eof_fut = sc.loop.create_future()
        self.wrote_eof = False
        self.disrupted = False  # closed, aborted, raised: its peer may see a short stream
        self.next_pause_at = 0  # received bytes before a callback may pause reading again

    @property
    def peer(self) -> Side:
        return self.sc.b if self is self.sc.a else self.sc.a

    def fail(self, why: str) -> None:
        self.sc.errors.append(f"{self.name}: {why}")

    def on_made(self, transport) -> None:
        if self.made:
            self.fail("connection_made twice")
        self.made = True
        self.transport = transport

    def on_data(self, data: bytes) -> None:
        if not self.made:
            self.fail("data before connection_made")
        if self.eof:
            self.fail("data after eof_received")
        if self.lost != "not yet":
            self.fail("data after connection_lost")
        want = pattern(self.peer.direction, self.received, len(data))
        if data != want:
            first = next(i for i, (x, y) in enumerate(zip(data, want, strict=False)) if x != y)
            self.fail(f"wrong bytes at offset {self.received + first} (chunk of {len(data)})")
        self.received += len(data)
        self.sc.in_callback(self, "data")

    def on_eof(self):
        if self.eof:
            self.fail("eof_received twice")
        if self.lost != "not yet":
            self.fail("eof_received after connection_lost")
        self.eof = True
        if not self.eof_fut.done():
            self.eof_fut.set_result(None)
        return self.sc.in_callback(self, "eof")

    def on_lost(self, exc) -> None:
        if self.lost != "not yet":
            self.fail("connection_lost twice")
        if not self.made:
            self.fail("connection_lost before connection_made")
        self.lost = exc
        if not self.lost_fut.done():
            self.lost_fut.set_result(exc)

    def write(self, kind: str, size: int) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.wrote_eof:
            return
        data = pattern(self.direction, self.sent, size)
        if kind == "bytes":
            t.write(data)
        elif kind == "bytearray":
            t.write(bytearray(data))
        elif kind == "memoryview":
            t.write(memoryview(bytearray(data))[0:])
        elif kind == "zcbuf" and isinstance(self.sc.loop, uringloop.UringEventLoop):
            buf = self.sc.loop.alloc_zerocopy_buffer(size)
            memoryview(buf)[:] = data
            t.write(buf)
        elif kind == "writelines":
            # all or nothing, as asyncio's (which joins or buffers the pieces before it
            # sends): when it raises, nothing went, or the transport failed and what
            # went before no longer counts
            cut = size // 2
            t.writelines(iter((data[:cut], bytearray(data[cut:]))))
        else:
            t.write(data)
        self.sent += size


class Plain(asyncio.Protocol):
    def __init__(self, side: Side) -> None:
        self.side = side

    def connection_made(self, transport):
        self.side.on_made(transport)

    def data_received(self, data):
        if self.side.transport is not None and self.side.transport.get_protocol() is not self:
            self.side.fail("data_received on a protocol that was replaced")
        self.side.on_data(bytes(data))

    def eof_received(self):
        return self.side.on_eof()

    def connection_lost(self, exc):
        self.side.on_lost(exc)

    def pause_writing(self):
        self.side.sc.in_callback(self.side, "pause_writing")

    def resume_writing(self):
        pass


class Buffered(Plain, asyncio.BufferedProtocol):
    def __init__(self, side: Side, size: int) -> None:
        super().__init__(side)
        self.buf = bytearray(size)

    def get_buffer(self, sizehint):
        self.side.sc.in_callback(self.side, "get_buffer")
        return self.buf

    def buffer_updated(self, nbytes):
        if self.side.transport is not None and self.side.transport.get_protocol() is not self:
            self.side.fail("buffer_updated on a protocol that was replaced")
        self.side.on_data(bytes(self.buf[:nbytes]))


class Scenario:
    def __init__(self, seed: int, index: int, loop_name: str, compare_mode: bool = False) -> None:
        self.seed, self.index, self.loop_name = seed, index, loop_name
        self.compare_mode = compare_mode
        self.rng = random.Random(f"{seed}:{index}")
        rng = self.rng
        self.family = rng.choice(["tcp", "unix"])
        self.multishot = rng.random() < 0.7
        self.zerocopy = rng.choice(["auto", "always", "never"])
        self.zc_threshold = rng.choice([4096, 65536])
        # disruptive scenarios close, abort, reset or raise; calm ones must deliver all
        self.calm = rng.random() < 0.45 or compare_mode
        self.fork = not self.calm and rng.random() < 0.04
        self.close_loop_early = not self.calm and rng.random() < 0.1
        self.nops = rng.randrange(3, 40)
        self.kinds = (rng.choice(["plain", "buffered"]), rng.choice(["plain", "buffered"]))
        # per-callback probabilities of actions (data, get_buffer, eof, pause_writing)
        self.p_pause = rng.choice([0, 0.1, 0.3])
        self.p_swap = rng.choice([0, 0.02, 0.1])
        self.p_close = 0 if self.calm else rng.choice([0, 0.01, 0.05])
        self.p_abort = 0 if self.calm else rng.choice([0, 0.01, 0.05])
        self.p_raise = 0 if self.calm else rng.choice([0, 0.005])
        self.p_stop = 0 if self.calm else rng.choice([0, 0.01])
        self.errors: list[str] = []
        self.refused_calls = 0  # transport calls an injected fault made raise
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.cb_rng = random.Random(f"{seed}:{index}:callbacks")

    def describe(self) -> str:
        return (
            f"{self.family} multishot={self.multishot} zerocopy={self.zerocopy}/"
            f"{self.zc_threshold} calm={self.calm} fork={self.fork} "
            f"close_loop_early={self.close_loop_early} kinds={self.kinds}"
        )

    def make_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop_name == "asyncio":
            return asyncio.SelectorEventLoop()
        return uringloop.UringEventLoop(
            recv_multishot=self.multishot, zerocopy=self.zerocopy, zc_threshold=self.zc_threshold
        )

    def protocol(self, side: Side, kind: str) -> asyncio.BaseProtocol:
        if kind == "buffered":
            # (no tiny buffers when comparing: asyncio's loop reads 1 byte per iteration
            # into them and does not finish megabytes within the scenario's time)
            sizes = [4096, 65536, 300_000] if self.compare_mode else [1, 100, 4096, 65536, 300_000]
            return Buffered(side, self.cb_rng.choice(sizes))
        return Plain(side)

    # ------------------------------------------------------------ callbacks that act

    def in_callback(self, side: Side, where: str):
        rng = self.cb_rng
        t = side.transport
        if t is None:
            return None
        if where == "eof":
            keep_open = rng.random() < 0.7 or self.calm
            if not keep_open:
                side.disrupted = True
            return keep_open
        if t.is_closing():
            return None
        r = rng.random()
        if where == "data" and r < self.p_pause and side.received >= side.next_pause_at:
            # (at most once per 16 KiB: a protocol with a 1-byte buffer sees a
            # callback per byte, and a pause per few bytes would crawl on any loop)
            side.next_pause_at = side.received + 16384
            t.pause_reading()
            self.loop.call_later(rng.choice([0, 0.001, 0.01]), self.resume, side)
        # one action at most, each with its own probability (0 for the disruptive ones
        # in calm scenarios)
        r = rng.random()
        # (not from get_buffer() when comparing: asyncio's loop then hands the bytes in
        # the old protocol's buffer to the new one, see test_protocol_switch.py)
        swap_points = ("data",) if self.compare_mode else ("data", "get_buffer")
        p_swap = self.p_swap if where in swap_points else 0
        p_raise = self.p_raise if where == "data" else 0
        edges = [p_swap]
        for p in (self.p_close, self.p_abort, self.p_stop, p_raise):
            edges.append(edges[-1] + p)
        if r < edges[0]:
            t.set_protocol(self.protocol(side, rng.choice(["plain", "buffered"])))
        elif r < edges[1]:
            side.disrupted = True
            t.close()
        elif r < edges[2]:
            side.disrupted = True
            t.abort()
        elif r < edges[3]:
            self.loop.stop()
        elif r < edges[4]:
            side.disrupted = True
            raise RuntimeError("fuzz: a protocol callback raised")
        return None

    def resume(self, side: Side) -> None:
        t = side.transport
        if t is not None and not t.is_closing() and not t.is_reading():
            t.resume_reading()

    # ------------------------------------------------------------ the driver

    async def connect(self, tmp: str) -> None:
        loop = self.loop
        self.a, self.b = Side(self, "a", 0), Side(self, "b", 1)
        made = loop.create_future()

        def server_factory():
            if not made.done():
                made.set_result(None)
            return self.protocol(self.b, self.kinds[1])

        if self.family == "unix":
            path = os.path.join(tmp, f"f{self.index}.sock")
            self.server = await loop.create_unix_server(server_factory, path)
            await loop.create_unix_connection(lambda: self.protocol(self.a, self.kinds[0]), path)
        else:
            self.server = await loop.create_server(server_factory, "127.0.0.1", 0)
            addr = self.server.sockets[0].getsockname()
            await loop.create_connection(lambda: self.protocol(self.a, self.kinds[0]), *addr)
        await asyncio.wait_for(made, 10)
        while self.b.transport is None:
            await asyncio.sleep(0.001)

    async def drive(self) -> None:
        rng = self.rng
        for _ in range(self.nops):
            side = self.a if rng.random() < 0.5 else self.b
            t = side.transport
            op = rng.choices(
                [
                    "write",
                    "writelines",
                    "pause",
                    "resume",
                    "swap",
                    "sleep0",
                    "sleep",
                    "eof",
                    "close",
                    "abort",
                    "reset",
                    "fork",
                ],
                weights=[
                    30,
                    5,
                    6,
                    6,
                    4,
                    10,
                    4,
                    1,
                    0 if self.calm else 1,
                    0 if self.calm else 1,
                    0 if self.calm else 0.5,
                    1 if self.fork else 0,
                ],
            )[0]
            if t is None or t.is_closing():
                continue
            try:
                await self.do(op, side, t)
            except (OSError, MemoryError):
                # an injected fault made a transport method fail: as on memory exhaustion,
                # write() then queued nothing; the scenario goes on
                if not FAULTS or op in ("close", "abort", "reset", "fork"):
                    raise
                self.refused_calls += 1
        if self.close_loop_early:
            return
        # the end: both sides finish writing; calm ones read everything
        for side in (self.a, self.b):
            t = side.transport
            if t is not None and not t.is_closing() and not side.wrote_eof:
                side.wrote_eof = True
                t.write_eof()
        start = self.loop.time()
        progress, moved_at = self.progress(), start
        while True:
            pending = [
                s
                for s in (self.a, self.b)
                if s.lost == "not yet" and not s.eof and not s.peer.disrupted and not s.disrupted
            ]
            if not pending:
                break
            now = self.loop.time()
            if self.progress() != progress:
                progress, moved_at = self.progress(), now
            if now - moved_at > STALL_TIMEOUT or now - start > SCENARIO_TIMEOUT_MAX:
                break  # the checks say what is missing
            for s in pending:
                self.resume(s)
            await asyncio.sleep(0.002)
        for side in (self.a, self.b):
            if side.transport is not None:
                side.transport.close()
        both_lost = asyncio.gather(self.a.lost_fut, self.b.lost_fut)
        if self.calm:
            await asyncio.wait_for(both_lost, SCENARIO_TIMEOUT / 2)
            return
        # A close() waits for the write buffer to drain and stops reading, on every
        # loop: two sides that close with data queued for each other wait for ever
        # (asyncio's loop too). Only then is abort() the way out.
        try:
            await asyncio.wait_for(asyncio.shield(both_lost), 2)
            return
        except asyncio.TimeoutError:
            pass
        stuck = [
            s
            for s in (self.a, self.b)
            if s.lost == "not yet" and s.transport.get_write_buffer_size() > 0
        ]
        if len(stuck) == 2:
            for s in stuck:
                s.disrupted = True
                s.transport.abort()
        await asyncio.wait_for(both_lost, SCENARIO_TIMEOUT / 2)

    def progress(self) -> tuple[int, int]:
        """The bytes each side has received so far: a delivery that moves is not stuck."""
        return (self.a.received, self.b.received) if hasattr(self, "b") else (0, 0)

    async def do(self, op: str, side: Side, t: asyncio.Transport) -> None:
        rng = self.rng
        if op == "write":
            size = rng.choices(SIZES, SIZE_WEIGHTS)[0]
            kind = rng.choice(["bytes", "bytearray", "memoryview", "zcbuf", "bytes"])
            side.write(kind, size)
        elif op == "writelines":
            side.write("writelines", rng.choices(SIZES, SIZE_WEIGHTS)[0])
        elif op == "pause":
            t.pause_reading()
        elif op == "resume":
            self.resume(side)
        elif op == "swap":
            t.set_protocol(self.protocol(side, rng.choice(["plain", "buffered"])))
        elif op == "sleep0":
            await asyncio.sleep(0)
        elif op == "sleep":
            await asyncio.sleep(rng.choice([0.001, 0.005]))
        elif op == "eof":
            side.wrote_eof = True
            t.write_eof()
        elif op == "close":
            side.disrupted = True
            t.close()
        elif op == "abort":
            side.disrupted = True
            t.abort()
        elif op == "reset":
            side.disrupted = True
            sock = t.get_extra_info("socket")
            if self.family == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            t.abort()
        elif op == "fork":
            self.fork_now()

    def fork_now(self) -> None:
        """Fork; the child pokes at what it inherited, the parent waits, then goes on."""
        pid = os.fork()
        if pid == 0:
            code = 0
            for side in (self.a, self.b):
                t = side.transport
                for call in (
                    lambda t=t: t.write(b"x"),
                    lambda t=t: t.pause_reading(),
                    lambda t=t: t.resume_reading(),
                    lambda t=t: t.write_eof(),
                ):
                    try:
                        call()
                        code = 3  # it should have refused
                    except RuntimeError:
                        pass
                    except BaseException:
                        code = 4
                try:
                    t.close()
                    t.abort()
                except BaseException:
                    code = 5
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            self.errors.append(f"forked child: wait status {status}")

    # ------------------------------------------------------------ running and checking

    def run(self, tmp: str) -> dict:
        _dataplane.faults_on(False)  # faults hit the scenario, not its set-up
        try:
            self.loop = loop = self.make_loop()
        except (OSError, MemoryError) as exc:
            if not FAULTS:  # an injected fault may refuse the loop itself
                raise
            return {"skipped": repr(exc)}
        loop.set_exception_handler(lambda loop, ctx: None)  # errors are part of the game
        ring = getattr(loop, "_ring", None)
        task = None
        try:
            connecting = loop.create_task(asyncio.wait_for(self.connect(tmp), 10))
            while not connecting.done():
                try:
                    loop.run_until_complete(connecting)
                except RuntimeError as exc:  # a callback stopped the loop: go on
                    if "stopped before" not in str(exc):
                        raise
            connecting.result()
            # each scenario meets its own faults, the same alone as in a run
            _dataplane.faults_on(True, self.rng.randrange(1 << 16))
            task = loop.create_task(self.drive())
            started = time.monotonic()
            deadline = started + SCENARIO_TIMEOUT
            progress = self.progress()
            while not task.done():
                try:
                    loop.run_until_complete(asyncio.wait_for(asyncio.shield(task), 1))
                except RuntimeError as exc:  # a callback stopped the loop: go on
                    if "stopped before" not in str(exc):
                        raise
                except asyncio.TimeoutError:
                    pass
                now = time.monotonic()
                if self.progress() != progress:  # slow but moving: more time, up to the cap
                    progress = self.progress()
                    deadline = min(
                        max(deadline, now + STALL_TIMEOUT), started + SCENARIO_TIMEOUT_MAX
                    )
                if now > deadline:
                    self.errors.append("scenario hung")
                    break
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                if isinstance(exc, asyncio.TimeoutError):
                    self.errors.append("connection_lost never came")
                elif not (FAULTS and isinstance(exc, (OSError, MemoryError))):
                    self.errors.append("driver raised: " + "".join(traceback.format_exception(exc)))
            if not self.close_loop_early:
                self.server.close()
        except (OSError, MemoryError) as exc:
            if not FAULTS:  # an injected fault may refuse the set-up itself
                raise
            self.errors = []
            return {"skipped": repr(exc)}
        finally:
            if task is not None and not task.done():
                task.cancel()
            start = time.monotonic()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                loop.close()
                elapsed = time.monotonic() - start
                # what loop.close() leaves open on every loop: the sockets of
                # transports and servers nobody closed
                for side in (getattr(self, "a", None), getattr(self, "b", None)):
                    if side is not None and side.transport is not None:
                        sock = getattr(side.transport, "_sock", None)
                        if sock is not None:
                            sock.close()
                server = getattr(self, "server", None)
                for sock in getattr(server, "_sockets", None) or ():
                    sock.close()
                gc.collect()
        if elapsed > CLOSE_BOUND:
            self.errors.append(f"loop.close() took {elapsed * 1000:.0f} ms")
        if ring is not None:
            stats, zc = ring.stats(), ring.zerocopy_stats()
            if stats["inflight"] or stats["records"]:
                self.errors.append(f"left in flight after close: {stats}")
            if zc["pinned_bytes"] or zc["pinned_buffers"]:
                self.errors.append(f"memory still lent after close: {zc}")
        self.check()
        return self.outcome()

    def check(self) -> None:
        if self.close_loop_early:
            return  # open at close: nothing more is promised than the leak checks
        for side in (self.a, self.b):
            if side.lost == "not yet":
                side.fail("connection_lost never came")
            peer = side.peer
            faulted = FAULTS and (
                isinstance(side.lost, Exception) or isinstance(peer.lost, Exception)
            )
            clean = not side.disrupted and not peer.disrupted and not faulted
            errored = isinstance(side.lost, Exception) or isinstance(peer.lost, Exception)
            if clean and not errored and side.received != peer.sent:
                side.fail(f"received {side.received} of {peer.sent} bytes before the end")
            if clean and not errored and not side.eof:
                side.fail("no eof_received in a clean scenario")
            if FAULTS and side.received != peer.sent and not (side.disrupted or peer.disrupted):
                if not errored:
                    side.fail(f"bytes lost without an error: {side.received} of {peer.sent}")

    def outcome(self) -> dict:
        return {
            side.name: (side.received, side.eof, type(side.lost).__name__)
            for side in (self.a, self.b)
        }


def run_one(
    seed: int, index: int, loop_name: str, compare: bool, tmp: str, counts: dict[str, int]
) -> list[str]:
    sc = Scenario(seed, index, loop_name, compare_mode=compare)
    before = open_sockets()
    try:
        result = sc.run(tmp)
    except Exception:
        return [f"harness: {traceback.format_exc()}"]
    counts["skipped" if "skipped" in result else "ran"] += 1
    counts["refused_calls"] += sc.refused_calls
    sides = [getattr(sc, "a", None), getattr(sc, "b", None)]
    counts["errors"] += any(s is not None and isinstance(s.lost, BaseException) for s in sides)
    errors = list(sc.errors)
    leaked = open_sockets() - before
    if leaked:
        errors.append(f"sockets left open: {sorted(leaked)}")
    if errors and sc.calm and loop_name != "asyncio" and not FAULTS:
        # A calm scenario must deliver everything; one that asyncio's own loop cannot
        # get through either is the harness's, not the loop's. (The case that made this
        # rule, seed 541860174 scenario 156, was a 1-byte get_buffer() receiving
        # megabytes: slow on both loops, not stuck. The waits now follow progress, and
        # it passes on both: 27 s on uringloop, 65 s on asyncio's.)
        ref = Scenario(seed, index, "asyncio", compare_mode=compare)
        try:
            ref.run(tmp)
        except Exception:
            ref.errors.append(f"harness: {traceback.format_exc()}")
        if ref.errors:
            counts["invalid"] += 1
            return []
    if compare and not errors and loop_name != "asyncio" and "skipped" not in result:
        ref = Scenario(seed, index, "asyncio", compare_mode=True)
        expected = ref.run(tmp)
        if ref.errors:
            errors.append(f"asyncio's loop itself failed: {ref.errors}")
        elif expected != result:
            errors.append(f"outcome {result} differs from asyncio's {expected}")
    return [f"{sc.describe()}\n    " + e for e in errors]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--only", type=int, default=None, help="run just this scenario")
    ap.add_argument("--loop", choices=["uringloop", "asyncio"], default="uringloop")
    ap.add_argument("--compare", action="store_true", help="also run calm ones on asyncio")
    ap.add_argument("--keep-going", action="store_true")
    args = ap.parse_args(argv)
    if SANITIZED and "site-packages" not in _dataplane.__file__:
        print(
            f"URINGLOOP_EXPECT_SANITIZERS is set, but {_dataplane.__file__} is not the "
            "installed sanitizer build",
            file=sys.stderr,
        )
        return 2
    if FAULTS and not _dataplane.FAULT_INJECTION:
        print(
            f"URINGLOOP_FAULTS is set, but {_dataplane.__file__} was built without fault "
            "injection (make fuzz builds one)",
            file=sys.stderr,
        )
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    indices = [args.only] if args.only is not None else range(args.start, args.start + args.count)
    failures = 0
    started = time.monotonic()
    counts = {"ran": 0, "skipped": 0, "errors": 0, "refused_calls": 0, "invalid": 0}
    ran = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in indices:
            ran += 1
            errors = run_one(seed, i, args.loop, args.compare, tmp, counts)
            if errors:
                failures += 1
                faults = os.environ.get("URINGLOOP_FAULTS")
                print(f"FAIL seed {seed} scenario {i}:")
                for e in errors:
                    print("  " + e)
                if SANITIZED:  # the sanitizer build: make sets it up and runs it
                    replay = f"make fuzz FUZZ_SEED={seed} FUZZ_ONLY={i}" + (
                        f" FUZZ_FAULTS={faults}" if faults else ""
                    )
                else:
                    replay = (
                        f"python tests/fuzz_streams.py --seed {seed} --only {i} --loop {args.loop}"
                        + (" --compare" if args.compare else "")
                    )
                print(f"  replay: {replay}", flush=True)
                if not args.keep_going:
                    break
    print(
        f"fuzz: seed {seed}, {ran} scenarios on {args.loop} in {time.monotonic() - started:.1f}s, "
        f"{failures} failed ({counts['errors']} ended with an error in connection_lost"
        + (
            f"; {counts['invalid']} calm ones fail on asyncio's loop too, not counted"
            if counts["invalid"]
            else ""
        )
        + (
            f"; injected faults: {counts['skipped']} refused at set-up, "
            f"{counts['refused_calls']} transport calls raised"
            if FAULTS
            else ""
        )
        + ")"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
