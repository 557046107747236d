"""pytest plugin for aiohttp's own test suite: a ``uringloop`` choice for its ``loop`` fixture.

tests/peer_suites.py loads it (``-p peer_suites_plugin``) into a run of the test modules of
aiohttp's sdist, whose files stay as released. aiohttp's ``pytest_generate_tests``
(aiohttp/pytest_plugin.py) parametrizes ``loop_factory``, the argument its ``loop`` fixture
makes the loop with, from ``--aiohttp-loop`` (``pyloop``, ``uvloop``, ``all``; a name ending
in ``?`` is optional); it knows no other names and raises on one. This plugin wraps that
hook: while it runs, the option reads ``pyloop`` and the ``loop_factory`` parametrization it
asks for is replaced by the loops the option really names, ``uringloop`` among them. The
test ids keep aiohttp's names (``[pyloop]`` is asyncio's loop from ``asyncio.new_event_loop``).

It also
- fails a test at set-up when its ``loop`` fixture made a loop of another type than the
  one its id names, so a run on uringloop cannot silently run on another loop;
- fails a test at teardown when the uringloop loop it ran on is not closed or still has
  an operation in the kernel, a record in its table or memory lent for SEND_ZC (what
  tests/conftest.py's ``ring_leak_check`` asserts for our own tests);
- deselects the tests that do not take the ``loop`` fixture (they run on loops of their
  own making, the same on every run) unless ``--peer-all-tests``;
- writes every test's outcome to ``--peer-results`` (JSON), the loop's id removed from
  the test's node id so runs on different loops compare test by test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

import uringloop

try:
    import uvloop
except ImportError:  # no wheel for this interpreter
    uvloop = None

# name -> (factory, the type its loops must have)
_LOOPS: dict[str, tuple] = {
    "pyloop": (asyncio.new_event_loop, asyncio.SelectorEventLoop),
    "uringloop": (uringloop.new_event_loop, uringloop.UringEventLoop),
}
if uvloop is not None:
    _LOOPS["uvloop"] = (uvloop.new_event_loop, uvloop.Loop)

_LOOP_KEY = pytest.StashKey[asyncio.AbstractEventLoop]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("peer_suites", "uringloop's peer-suite runner")
    group.addoption("--peer-results", metavar="FILE", help="write each test's outcome here (JSON)")
    group.addoption(
        "--peer-all-tests",
        action="store_true",
        help="also run the tests that do not take the loop fixture",
    )


def _wanted(option: str) -> dict[str, tuple]:
    """The loops --aiohttp-loop names, read as aiohttp reads it, uringloop added."""
    if option == "all":
        option = "pyloop,uvloop?,uringloop?"
    wanted = {}
    for name in option.split(","):
        required = not name.strip().endswith("?")
        name = name.strip(" ?")
        if name in _LOOPS:
            wanted[name] = _LOOPS[name]
        elif required:
            raise pytest.UsageError(
                f"--aiohttp-loop: no loop {name!r} here; there are {', '.join(_LOOPS)}"
            )
    return wanted


def pytest_configure(config: pytest.Config) -> None:
    import aiohttp

    # The sdist's own aiohttp/ (pure Python, no compiled parser) must not shadow the
    # installed wheel: it would be on sys.path if pytest ran with the sdist as cwd.
    sdist = str(config.rootpath) + os.sep
    if aiohttp.__file__.startswith(sdist):
        raise pytest.UsageError(f"aiohttp imported from the sdist ({aiohttp.__file__})")
    path = config.getoption("peer_results")
    if path:
        config.pluginmanager.register(_Recorder(path), "peer-suites-recorder")


@pytest.hookimpl(wrapper=True)
def pytest_generate_tests(metafunc: pytest.Metafunc):
    if "loop_factory" not in metafunc.fixturenames:
        return (yield)
    option = metafunc.config.option
    wanted = _wanted(option.aiohttp_loop)
    parametrize = metafunc.parametrize
    asked = []

    def our_parametrize(argnames, argvalues, *args, **kwargs):
        if argnames == "loop_factory":
            asked.append(argnames)
            kwargs["ids"] = list(wanted)
            argvalues = [factory for factory, _ in wanted.values()]
        return parametrize(argnames, argvalues, *args, **kwargs)

    saved, option.aiohttp_loop = option.aiohttp_loop, "pyloop"
    metafunc.parametrize = our_parametrize
    try:
        result = yield
    finally:
        del metafunc.parametrize
        option.aiohttp_loop = saved
    if not asked:
        raise pytest.UsageError(
            f"aiohttp's pytest_generate_tests did not parametrize loop_factory for "
            f"{metafunc.definition.nodeid}: this plugin does not know this aiohttp"
        )
    return result


def _loop_name(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None or "loop_factory" not in callspec.params:
        return None
    factory = callspec.params["loop_factory"]
    return next(name for name, (f, _) in _LOOPS.items() if f is factory)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("peer_all_tests"):
        return
    keep = [item for item in items if _loop_name(item) is not None]
    if len(keep) < len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    value = yield
    if fixturedef.argname == "loop" and isinstance(value, asyncio.AbstractEventLoop):
        name = _loop_name(request.node)
        if name is not None:
            expected = _LOOPS[name][1]
            if not isinstance(value, expected):
                raise AssertionError(
                    f"the loop fixture of a [{name}] test made a loop of type "
                    f"{type(value).__module__}.{type(value).__qualname__}, "
                    f"not {expected.__module__}.{expected.__qualname__}"
                )
        request.node.stash[_LOOP_KEY] = value
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    result = yield
    loop = item.stash.get(_LOOP_KEY, None)
    if isinstance(loop, uringloop.UringEventLoop):
        if not loop.is_closed():
            raise AssertionError("the uringloop loop of this test was left open")
        stats = loop._ring.stats()
        zc = loop._ring.zerocopy_stats()
        if stats["inflight"] or stats["records"] or zc["pinned_buffers"] or zc["pinned_bytes"]:
            raise AssertionError(f"uringloop loop closed with operations outstanding: {stats} {zc}")
    return result


def _normalized(nodeid: str, loop: str | None) -> str:
    """The node id with the loop's id taken out of the parameter ids."""
    if loop is None or not nodeid.endswith("]") or "[" not in nodeid:
        return nodeid
    head, _, params = nodeid[:-1].partition("[")
    parts = params.split("-")
    if loop in parts:
        parts.remove(loop)
    return f"{head}[{'-'.join(parts)}]" if parts else head


class _Recorder:
    """Each test's outcome, one JSON line as soon as it is known, so a run that dies
    still says how far it got: a ``start`` line before each test, then its ``result``.

    The first phase (set-up, call, teardown) that did not pass decides the outcome; a
    teardown error after a passed call counts as an error.
    """

    def __init__(self, path: str) -> None:
        self.file = open(path, "w")  # open for the whole session
        self.loops: dict[str, str | None] = {}
        self.outcomes: dict[str, dict] = {}

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        import aiohttp

        self._write(
            {
                "kind": "session",
                "python": sys.version.split()[0],
                "aiohttp": aiohttp.__version__,
                "aiohttp_file": aiohttp.__file__,
                "uringloop_file": uringloop.__file__,
            }
        )

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.loops = {item.nodeid: _loop_name(item) for item in items}

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self._write({"kind": "start", "nodeid": nodeid})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            else:
                outcome = report.outcome
        elif report.failed:
            outcome = "error"
        elif report.skipped:  # at set-up: a skip mark, pytest.skip or pytest.xfail
            outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        else:
            return
        previous = self.outcomes.get(report.nodeid)
        if previous is not None and previous["outcome"] != "passed":
            return
        message = ""
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)[-300:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        loop = self.loops.get(report.nodeid)
        self.outcomes[report.nodeid] = {
            "kind": "result",
            "nodeid": report.nodeid,
            "test": _normalized(report.nodeid, loop),
            "loop": loop,
            "when": report.when,
            "outcome": outcome,
            "message": message.strip().splitlines()[0][:300] if message.strip() else "",
        }

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        if nodeid in self.outcomes:
            self._write(self.outcomes[nodeid])

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._write({"kind": "finish", "exitstatus": int(exitstatus)})
        self.file.close()
