"""Every documented way of switching a program to uringloop gives a uringloop loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import warnings

import pytest

import uringloop


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


@pytest.fixture
def restore_policy():
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(None)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+")
def test_asyncio_run_with_loop_factory():
    assert asyncio.run(_loop_type(), loop_factory=uringloop.new_event_loop) is uringloop.Loop


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is 3.11+")
def test_asyncio_runner_with_loop_factory():
    with asyncio.Runner(loop_factory=uringloop.new_event_loop) as runner:
        assert runner.run(_loop_type()) is uringloop.Loop
        assert isinstance(runner.get_loop(), uringloop.UringEventLoop)


def test_uringloop_run():
    assert uringloop.run(_loop_type()) is uringloop.Loop


def test_uringloop_run_passes_debug():
    async def debug_flag():
        return asyncio.get_running_loop().get_debug()

    assert uringloop.run(debug_flag(), debug=True) is True


def test_event_loop_policy(restore_policy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(uringloop.EventLoopPolicy())
    assert asyncio.run(_loop_type()) is uringloop.Loop


def test_install(restore_policy):
    uringloop.install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert isinstance(asyncio.get_event_loop_policy(), uringloop.EventLoopPolicy)
    assert asyncio.run(_loop_type()) is uringloop.Loop


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="child watchers are deprecated on 3.12+")
def test_policy_keeps_child_watcher_methods_on_311(restore_policy):
    policy = uringloop.EventLoopPolicy()
    assert hasattr(policy, "get_child_watcher") and hasattr(policy, "set_child_watcher")


def test_info_command_reports_probed_features():
    proc = subprocess.run(
        [sys.executable, "-m", "uringloop", "info"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("kernel:", "SEND_ZC", "DEFER_TASKRUN", "multishot accept", "registered buffers"):
        assert needle in out
    probed = uringloop.probe()
    assert ("SEND_ZC                  yes" in out) == probed.send_zc
