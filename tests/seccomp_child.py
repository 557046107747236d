"""Run as a child process: block io_uring_setup with a seccomp filter, then try uringloop.

Usage: python seccomp_child.py ERRNO_NAME. Prints one JSON line describing what happened.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import sys
import warnings

NR_IO_URING_SETUP = 425  # the same number on every architecture
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def block_io_uring_setup(err: int) -> None:
    block_syscall(NR_IO_URING_SETUP, err)


def block_syscall(nr: int, err: int) -> None:
    """From now on, system call number nr fails with err in this process."""
    prog = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 0),  # A = seccomp_data.nr
        SockFilter(0x15, 0, 1, nr),  # if A == nr
        SockFilter(0x06, 0, 0, SECCOMP_RET_ERRNO | err),  #   return -err
        SockFilter(0x06, 0, 0, SECCOMP_RET_ALLOW),  # else allow
    )
    fprog = SockFprog(len(prog), prog)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


async def loop_type() -> str:
    return type(asyncio.get_running_loop()).__name__


def main() -> None:
    block_io_uring_setup(getattr(errno, sys.argv[1]))
    import uringloop

    report: dict = {}
    try:
        uringloop.new_event_loop()
        report["new_event_loop"] = "created"
    except uringloop.UringUnavailableError as exc:
        report["new_event_loop"] = {
            "type": type(exc).__name__,
            "is_oserror": isinstance(exc, OSError),
            "errno": exc.errno,
            "message": str(exc),
        }

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("uringloop").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.set_event_loop_policy(uringloop.EventLoopPolicy())
        report["fallback_loop"] = asyncio.run(loop_type())
        report["fallback_loop_again"] = asyncio.run(loop_type())
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    report["log_records"] = records

    for label, policy in (
        ("fallback_false", uringloop.EventLoopPolicy(fallback=False)),
        ("require_env", None),
    ):
        if policy is None:
            os.environ["URINGLOOP_REQUIRE"] = "1"
            policy = uringloop.EventLoopPolicy()
        try:
            policy.new_event_loop()
            report[label] = "created"
        except uringloop.UringUnavailableError as exc:
            report[label] = exc.errno
    print(json.dumps(report))


if __name__ == "__main__":
    main()
