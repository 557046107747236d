"""pytest plugin for tests/uvloop_suite.py: uvloop's asyncio test classes on another loop.

uvloop's test modules run every shared test twice: on uvloop (``Test_UV_*``, through
``uvloop._testbase.UVTestCase``) and on asyncio's loop (``Test_AIO_*``, through
``AIOTestCase``), whose expectations are asyncio's. With UVLOOP_SUITE_LOOP=uringloop this
plugin makes AIOTestCase's loop and policy uringloop's, so the AIO classes hold uringloop
to asyncio's expectations; unset, they run on asyncio's loop as uvloop's CI runs them.
Their files are untouched.
"""

from __future__ import annotations

import os

from uvloop import _testbase

if os.environ.get("UVLOOP_SUITE_LOOP") == "uringloop":
    import uringloop

    def _new_loop(self):
        return uringloop.new_event_loop()

    def _new_policy(self):
        return uringloop.EventLoopPolicy()

    _testbase.AIOTestCase.new_loop = _new_loop
    _testbase.AIOTestCase.new_policy = _new_policy


def pytest_report_header(config):
    return f"uvloop_suite_plugin: AIO classes on {os.environ.get('UVLOOP_SUITE_LOOP', 'asyncio')}"
