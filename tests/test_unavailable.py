"""When io_uring is refused (seccomp, sysctl), uringloop says why and degrades cleanly.

The refusal is real: a child process installs a seccomp filter that makes the
kernel fail io_uring_setup with EPERM or ENOSYS, as Docker's default profile does.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_child(errno_name: str) -> dict:
    env = dict(os.environ)
    env.pop("URINGLOOP_REQUIRE", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "seccomp_child.py"), errno_name],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "errno_name, cause",
    [("EPERM", "seccomp filter"), ("ENOSYS", "seccomp filter hides io_uring_setup")],
)
def test_blocked_io_uring_setup(errno_name, cause):
    report = run_child(errno_name)
    err = report["new_event_loop"]
    assert err["type"] == "UringUnavailableError" and err["is_oserror"]
    assert err["errno"] == getattr(errno, errno_name)
    assert errno_name in err["message"] and cause in err["message"]
    assert "To fix:" in err["message"]

    # The policy falls back to asyncio's loop, warning exactly once (warnings + logging).
    assert report["fallback_loop"] == report["fallback_loop_again"] == "_UnixSelectorEventLoop"
    assert len(report["warnings"]) == 1 and "falling back" in report["warnings"][0]
    assert len(report["log_records"]) == 1 and errno_name in report["log_records"][0]

    # ...unless told to require io_uring.
    assert report["fallback_false"] == getattr(errno, errno_name)
    assert report["require_env"] == getattr(errno, errno_name)
