"""gunicorn worker classes that run uvicorn on uringloop.

``gunicorn app:app -k uringloop.workers.UvicornWorker -w 4`` starts four processes, each
serving the ASGI app with uvicorn on its own uringloop loop. The arbiter binds the
listening socket and forks the workers; each worker makes its ring in ``run()``, after
the fork, so no ring is ever shared between processes. The workers accept from the
shared socket on readiness, so connections spread over whichever workers are idle.

Needs ``gunicorn`` and either the ``uvicorn-worker`` package or uvicorn's own
(deprecated) ``uvicorn.workers`` module.
"""

from __future__ import annotations

import warnings
from typing import Any

try:
    from uvicorn_worker import UvicornWorker as _UvicornWorker
except ImportError:  # uvicorn before the worker moved into its own package
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from uvicorn.workers import UvicornWorker as _UvicornWorker

__all__ = ["UvicornH11Worker", "UvicornWorker"]


class UvicornWorker(_UvicornWorker):
    """uvicorn's gunicorn worker with ``loop="uringloop:new_event_loop"``."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "uringloop:new_event_loop", "http": "auto"}


class UvicornH11Worker(UvicornWorker):
    """The same with uvicorn's pure-Python h11 HTTP parser."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "uringloop:new_event_loop", "http": "h11"}
