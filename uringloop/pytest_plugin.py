"""pytest plugin: a project's async tests on uringloop, switched on with one setting.

The plugin is installed with the package (a ``pytest11`` entry point) and does nothing
until a project names the loops its async tests should run on::

    # pyproject.toml
    [tool.pytest.ini_options]
    uringloop_loops = ["uringloop"]          # or ["uringloop", "asyncio"]: every test on both

or, for one run, ``pytest --uringloop-loops=uringloop,asyncio``. The names are
``uringloop``, ``asyncio`` and ``uvloop`` (when installed).

With the setting,

* pytest-asyncio (1.3 or newer, which has the ``pytest_asyncio_loop_factories`` hook) runs
  every ``@pytest.mark.asyncio`` test, and every async fixture, once per named loop. A
  ``pytest_asyncio_loop_factories`` hook in the project's own conftest takes precedence.
* anyio's pytest plugin gets an ``anyio_backend`` fixture that runs ``@pytest.mark.anyio``
  tests on the asyncio backend with each named loop as its ``loop_factory``. A project's
  own ``anyio_backend`` fixture takes precedence, as conftest fixtures always do.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any

import pytest

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

_HELP = "loops to run async tests on, e.g. uringloop or uringloop,asyncio (names: %s)"


def _known_factories() -> dict[str, LoopFactory]:
    import uringloop

    factories: dict[str, LoopFactory] = {
        "uringloop": uringloop.new_event_loop,
        "asyncio": asyncio.SelectorEventLoop,
    }
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_addoption(parser: pytest.Parser) -> None:
    names = "uringloop, asyncio, uvloop"
    parser.addoption(
        "--uringloop-loops", dest="uringloop_loops", metavar="NAMES", help=_HELP % names
    )
    parser.addini("uringloop_loops", _HELP % names, type="args", default=[])


def _selected(config: pytest.Config) -> list[str]:
    option = config.getoption("uringloop_loops")
    names = option.split(",") if option else config.getini("uringloop_loops")
    return [n.strip() for n in names if n.strip()]


def pytest_configure(config: pytest.Config) -> None:
    names = _selected(config)
    if not names:
        return
    known = _known_factories()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise pytest.UsageError(
            f"uringloop_loops: unknown loop {', '.join(map(repr, unknown))}; "
            f"this environment has {', '.join(known)}"
        )
    _register(config, {name: known[name] for name in names})


def _register(config: pytest.Config, factories: dict[str, LoopFactory]) -> None:
    # The hook exists only where pytest-asyncio declared it; registering an
    # implementation of an undeclared pytest_* hook is an error.
    if hasattr(config.hook, "pytest_asyncio_loop_factories"):
        config.pluginmanager.register(_AsyncioHook(factories), "uringloop-asyncio-hook")

    # Registered after anyio's own plugin, so this replaces its default fixture.
    @pytest.fixture(scope="module", params=list(factories))
    def anyio_backend(request: pytest.FixtureRequest) -> Any:
        return ("asyncio", {"loop_factory": factories[request.param]})

    backends = types.ModuleType("uringloop_anyio_backends")
    backends.anyio_backend = anyio_backend  # type: ignore[attr-defined]
    config.pluginmanager.register(backends, "uringloop-anyio-backends")


class _AsyncioHook:
    """Registered only when loops were named, so an unconfigured project sees nothing."""

    def __init__(self, factories: dict[str, LoopFactory]) -> None:
        self.factories = factories

    @pytest.hookimpl(trylast=True)
    def pytest_asyncio_loop_factories(
        self, config: pytest.Config, item: pytest.Item
    ) -> dict[str, LoopFactory]:
        return self.factories
