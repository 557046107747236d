"""The non-network loop API behaves like asyncio's, on every loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import socket
import sys
import threading
import time

import pytest


@pytest.mark.asyncio
async def test_call_soon_runs_in_fifo_order():
    loop = asyncio.get_running_loop()
    seen = []
    done = loop.create_future()
    for i in range(100):
        loop.call_soon(seen.append, i)
    loop.call_soon(done.set_result, None)
    await done
    assert seen == list(range(100))


@pytest.mark.asyncio
async def test_call_later_order_and_never_early():
    loop = asyncio.get_running_loop()
    fired: list[tuple[float, float]] = []
    done = loop.create_future()
    start = loop.time()
    delays = [0.05, 0.01, 0.03, 0.0, 0.02, 0.04]
    for d in delays:
        loop.call_later(d, lambda d=d: fired.append((d, loop.time() - start)))
    loop.call_later(0.06, done.set_result, None)
    await done
    assert [d for d, _ in fired] == sorted(delays)
    res = getattr(loop, "_clock_resolution", 0.001)  # uvloop keeps ms timers
    for delay, elapsed in fired:
        assert elapsed + res >= delay, (delay, elapsed)


@pytest.mark.asyncio
async def test_call_at_and_time_are_monotonic():
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert abs(t0 - time.monotonic()) < 1.0
    fut = loop.create_future()
    loop.call_at(t0 + 0.02, lambda: fut.set_result(loop.time()))
    assert await fut >= t0 + 0.02 - getattr(loop, "_clock_resolution", 0.001)


@pytest.mark.asyncio
async def test_cancelled_timer_does_not_fire():
    loop = asyncio.get_running_loop()
    fired = []
    handle = loop.call_later(0.01, fired.append, 1)
    handle.cancel()
    await asyncio.sleep(0.03)
    assert fired == [] and handle.cancelled()


@pytest.mark.asyncio
async def test_call_soon_threadsafe_wakes_a_blocked_loop():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    woke = []

    def from_thread():
        time.sleep(0.05)
        woke.append(time.monotonic())
        loop.call_soon_threadsafe(fut.set_result, time.monotonic())

    # No timer is pending, so the loop sleeps in the kernel with no timeout: only
    # the wake-up can get it out (wait_for is the safety net, 10 s).
    threading.Thread(target=from_thread).start()
    sent = await asyncio.wait_for(fut, 10)
    assert time.monotonic() - sent < 1.0


@pytest.mark.asyncio
async def test_tasks_names_contexts_and_cancellation():
    loop = asyncio.get_running_loop()
    var = contextvars.ContextVar("var", default="unset")

    async def read_var():
        await asyncio.sleep(0)
        return var.get()

    if sys.version_info >= (3, 11):  # create_task(context=) is 3.11+
        ctx = contextvars.copy_context()
        ctx.run(var.set, "in-ctx")
        task = loop.create_task(read_var(), name="reader", context=ctx)
        assert task.get_name() == "reader"
        assert await task == "in-ctx"
    task = loop.create_task(read_var(), name="plain")
    assert task.get_name() == "plain"
    assert await task == "unset"

    blocker = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    blocker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocker

    results = await asyncio.gather(*(asyncio.sleep(0.001 * i, result=i) for i in range(10)))
    assert results == list(range(10))


@pytest.mark.asyncio
async def test_futures_and_done_callbacks():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    seen = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    loop.call_soon(fut.set_result, "x")
    assert await fut == "x"
    await asyncio.sleep(0)
    assert seen == ["x"]
    bad = loop.create_future()
    bad.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await bad


@pytest.mark.asyncio
async def test_run_in_executor_and_set_default_executor():
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, sum, [1, 2, 3]) == 6
    names = []
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="custom") as ex:
        loop.set_default_executor(ex)
        await loop.run_in_executor(None, lambda: names.append(threading.current_thread().name))
    assert names[0].startswith("custom")


@pytest.mark.asyncio
async def test_getaddrinfo_and_getnameinfo():
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
    assert infos[0][4] == ("127.0.0.1", 80)
    flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    host, port = await loop.getnameinfo(("127.0.0.1", 80), flags)
    assert (host, port) == ("127.0.0.1", "80")


@pytest.mark.asyncio
async def test_exception_handler_receives_callback_errors():
    loop = asyncio.get_running_loop()
    got = loop.create_future()

    def handler(lp, context):
        if not got.done():
            got.set_result(context)

    loop.set_exception_handler(handler)
    try:
        assert loop.get_exception_handler() is handler
        loop.call_soon(lambda: 1 / 0)
        context = await asyncio.wait_for(got, 5)
        assert isinstance(context["exception"], ZeroDivisionError)
    finally:
        loop.set_exception_handler(None)


@pytest.mark.asyncio
async def test_async_generators_are_finalized_by_shutdown_asyncgens():
    loop = asyncio.get_running_loop()
    closed = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    g = agen()
    assert await g.__anext__() == 1
    await loop.shutdown_asyncgens()
    assert closed == [True]


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    from conftest import _factories

    return _factories()[kind]()


LOOP_KINDS = ["asyncio", "uvloop", "uringloop"]


@pytest.fixture(params=LOOP_KINDS)
def plain_loop(request):
    try:
        loop = _new_loop(request.param)
    except KeyError:
        pytest.skip(f"{request.param} is not installed for this interpreter")
    yield loop
    if not loop.is_closed():
        loop.close()


def test_run_forever_stop_and_state(plain_loop):
    loop = plain_loop
    assert not loop.is_running() and not loop.is_closed()
    seen = []
    loop.call_soon(lambda: seen.append(loop.is_running()))
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [True] and not loop.is_running()
    assert loop.run_until_complete(asyncio.sleep(0.001, result=5)) == 5
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
    assert loop.is_closed()
    loop.close()  # idempotent
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        loop.run_until_complete(coro)
    coro.close()


def test_close_while_running_is_refused(plain_loop):
    loop = plain_loop
    errors = []

    def try_close():
        try:
            loop.close()
        except RuntimeError as exc:
            errors.append(exc)
        loop.stop()

    loop.call_soon(try_close)
    loop.run_forever()
    assert len(errors) == 1


def test_debug_mode_warns_about_slow_callbacks(plain_loop, caplog):
    loop = plain_loop
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01
    assert loop.get_debug()
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(time.sleep, 0.05)
        loop.run_until_complete(asyncio.sleep(0.01))
    assert any("took" in r.getMessage() for r in caplog.records), caplog.text
    loop.set_debug(False)


def test_idle_loop_uses_no_cpu(plain_loop):
    """A loop waiting 0.5 s for a timer must sleep in the kernel, not spin."""
    loop = plain_loop
    start = time.process_time()
    loop.run_until_complete(asyncio.sleep(0.5))
    used = time.process_time() - start
    assert used < 0.05, f"idle loop used {used:.3f}s of CPU in 0.5s"
