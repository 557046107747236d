"""uvloop's own test suite, its asyncio classes, on asyncio's loop and on uringloop.

    .venv-main/bin/python tests/uvloop_suite.py        # about a minute per loop

uvloop's tests (tests/test_tcp.py, test_unix.py, test_udp.py, test_sockets.py,
test_context.py, test_process.py, ...) run each shared test on uvloop (``Test_UV_*``) and
on asyncio's loop (``Test_AIO_*``, with asyncio's expectations: where the loops differ
the tests branch on the implementation). This runs the AIO classes twice, in their own
pytest processes: on asyncio's loop, and with tests/uvloop_suite_plugin.py making
uringloop their loop. It fails when a test fails on uringloop and passes on asyncio's
loop. (The UV classes hold a loop to uvloop's own choices where uvloop and asyncio
differ: duck-typed buffered protocols, TCP_NODELAY on sockets passed in, no DNS in
sendto(), its contextvars model; uringloop keeps asyncio's.)

1. Downloads the sdist of the uvloop version installed here (the benchmarks' uvloop)
   with ``pip download --no-binary`` into build/suites/ (kept), unpacks it and moves its
   source package aside: the tests import the installed uvloop (its ``_testbase``).
2. Runs ``pytest tests -k AIO`` from the sdist on each loop (uvloop's test_sourcecode
   and test_cython are left out: they check uvloop's own source and extension).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from peer_suites import fetch_sdist, log

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
LEFT_OUT = ["tests/test_sourcecode.py", "tests/test_cython.py"]
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)")


def prepare(cache: Path) -> Path:
    version = importlib.metadata.version("uvloop")
    source = fetch_sdist(version, cache, name="uvloop")
    package = source / "uvloop"
    if package.is_dir():  # would shadow the installed uvloop (no built extension here)
        package.rename(source / "uvloop-source")
    return source


def run_suite(source: Path, loop: str, timeout: float) -> tuple[dict[str, str], str]:
    """Each test's outcome (a failing one wins over a pass of the same node id: a test
    that fails in teardown reports both) and pytest's summary line."""
    env = dict(os.environ, PYTHONPATH=f"{HERE}:{ROOT}", PYTHONDONTWRITEBYTECODE="1")
    env.pop("UVLOOP_SUITE_LOOP", None)
    if loop == "uringloop":
        env["UVLOOP_SUITE_LOOP"] = "uringloop"
    cmd = [sys.executable, "-m", "pytest", "tests", "-k", "AIO", "-rA", "-p", "no:cacheprovider"]
    cmd += ["-p", "uvloop_suite_plugin", "-o", "addopts=", "-W", "ignore::DeprecationWarning"]
    for path in LEFT_OUT:
        cmd += ["--ignore", path]
    log(f"uvloop's AIO tests on {loop}")
    hung = False
    try:
        out = subprocess.run(
            cmd, cwd=source, env=env, capture_output=True, text=True, timeout=timeout
        ).stdout
    except subprocess.TimeoutExpired as e:
        # (a test that leaves an executor thread blocked keeps pytest from exiting after
        # its report: what it printed still says which tests failed)
        log(f"uvloop's tests on {loop} did not end within {timeout:.0f} s")
        out, hung = e.stdout or "", True
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
    outcomes: dict[str, str] = {}
    for line in out.splitlines():
        m = OUTCOME.match(line)
        if m and outcomes.get(m.group(2)) not in ("FAILED", "ERROR"):
            outcomes[m.group(2)] = m.group(1)
    summary = out.strip().splitlines()[-1] if out.strip() else "(no output)"
    return outcomes, summary + (" (and did not exit)" if hung else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "build" / "suites")
    parser.add_argument("--timeout", type=float, default=300.0, help="per loop, seconds")
    args = parser.parse_args()
    source = prepare(args.cache)
    results = {}
    for loop in ("asyncio", "uringloop"):
        results[loop] = run_suite(source, loop, args.timeout)
        log(f"{loop}: {results[loop][1]}")
    reference, ours = results["asyncio"][0], results["uringloop"][0]
    if not reference or not ours:
        log("a run collected nothing")
        return 1
    bad = sorted(
        test
        for test, outcome in ours.items()
        if outcome in ("FAILED", "ERROR") and reference.get(test) == "PASSED"
    )
    for test in bad:
        log(f"fails on uringloop, passes on asyncio's loop: {test}")
    missing = sorted(set(reference) - set(ours))
    for test in missing:
        log(f"ran on asyncio's loop, not on uringloop: {test}")
    hung = any(summary.endswith("(and did not exit)") for _, summary in results.values())
    return 1 if bad or missing or hung else 0


if __name__ == "__main__":
    sys.exit(main())
