"""Run CPython's own asyncio tests with the event loop policy set to a chosen loop.

    python tests/cpython_compat.py --loop uringloop            # the loop-level suites
    python tests/cpython_compat.py --loop uvloop --loop asyncio --loop uringloop \\
        --json out.json --markdown out.md                     # side by side
    python tests/cpython_compat.py --loop uringloop --modules test_streams test_server

CPython ships these tests with the interpreter (``test.test_asyncio``). Only the
tests that take their loop from the policy exercise the loop under test: many
build ``SelectorEventLoop``, a ``TestLoop`` or mocks themselves. The runner
therefore records, for every test, whether the policy made a loop while it ran
("policy-loop tests"), and reports those counts separately from the totals.

The same two shims apply to every loop, so the comparison is fair:
- ``TestCase.close_loop`` reads the private ``loop._default_executor``; the shim
  reads it with getattr (uvloop has no such attribute).
- On 3.11 many ``setUp``s call ``asyncio.set_child_watcher()``; a policy without
  the child-watcher methods gets ones that only remember the watcher.
When a test resets the policy (``set_event_loop_policy(None)``), the next
``get_event_loop_policy()`` makes a policy of the loop under test again, not
asyncio's default.

Each module runs in its own child process, one test at a time written to a
JSON-lines file. A test that hangs past ``--test-timeout`` or crashes the child
is recorded as such and the module resumes after it in a new child.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

# The loop-level suites issue 5 names.
DEFAULT_MODULES = [
    "test_events",
    "test_streams",
    "test_server",
    "test_sock_lowlevel",
    "test_sendfile",
    "test_subprocess",
    "test_ssl",
    "test_sslproto",
    "test_base_events",
    "test_unix_events",
    "test_tasks",
    "test_futures",
    "test_taskgroups",
    "test_timeouts",
    "test_runners",
    "test_buffered_proto",
    "test_pep492",
    "test_queues",
    "test_locks",
    "test_context",
    "test_waitfor",
    "test_threads",
]

# ---------------------------------------------------------------- child side


def _make_policy_class(loop_name: str) -> type:
    import asyncio

    if loop_name == "asyncio":
        base: type = asyncio.DefaultEventLoopPolicy
    elif loop_name == "uvloop":
        import uvloop

        base = uvloop.EventLoopPolicy
    elif loop_name == "uringloop":
        import uringloop

        base = uringloop.EventLoopPolicy
    else:
        raise SystemExit(f"unknown loop {loop_name!r}")

    class CountingPolicy(base):  # type: ignore[misc,valid-type]
        loops_made = 0

        def new_event_loop(self):  # type: ignore[no-untyped-def]
            loop = super().new_event_loop()
            type(self).loops_made += 1
            return loop

    abstract = getattr(asyncio.AbstractEventLoopPolicy, "set_child_watcher", None)
    if hasattr(asyncio, "set_child_watcher") and getattr(base, "set_child_watcher", None) in (
        None,
        abstract,
    ):
        # Shim: a policy without child watchers (uvloop) only remembers the watcher.
        def get_child_watcher(self):  # type: ignore[no-untyped-def]
            return getattr(self, "_shim_watcher", None)

        def set_child_watcher(self, watcher):  # type: ignore[no-untyped-def]
            self._shim_watcher = watcher

        CountingPolicy.get_child_watcher = get_child_watcher  # type: ignore[attr-defined]
        CountingPolicy.set_child_watcher = set_child_watcher  # type: ignore[attr-defined]
    return CountingPolicy


def _install(loop_name: str) -> type:
    import asyncio
    from asyncio import events

    policy_class = _make_policy_class(loop_name)

    def init_policy() -> None:
        with events._lock:
            if events._event_loop_policy is None:
                events._event_loop_policy = policy_class()

    events._init_event_loop_policy = init_policy
    asyncio.set_event_loop_policy(policy_class())

    from test.test_asyncio import utils as test_utils

    def close_loop(loop):  # type: ignore[no-untyped-def]
        executor = getattr(loop, "_default_executor", None)
        if executor is not None:
            if not loop.is_closed():
                loop.run_until_complete(loop.shutdown_default_executor())
            else:
                executor.shutdown(wait=True)
        loop.close()
        _join_watcher_threads()

    test_utils.TestCase.close_loop = staticmethod(close_loop)
    return policy_class


def _join_watcher_threads() -> None:
    # What the original close_loop does after closing: wait for ThreadedChildWatcher.
    import asyncio

    from test import support

    policy = support.maybe_get_event_loop_policy()
    if policy is None or not hasattr(policy, "get_child_watcher"):
        return
    try:
        watcher = policy.get_child_watcher()
    except NotImplementedError:  # what the original does for policies without watchers
        return
    threaded = getattr(asyncio, "ThreadedChildWatcher", None)
    if threaded is not None and isinstance(watcher, threaded):
        for thread in list(watcher._threads.values()):
            thread.join(timeout=support.SHORT_TIMEOUT)


# Classes that build asyncio's epoll SelectorEventLoop themselves, and the method
# that does it: with --retarget they get the policy's loop instead.
RETARGET = {
    "EPollEventLoopTests": "create_event_loop",
    "SelectorStartServerTests": "new_loop",
}


def _retarget(module_name: str) -> None:
    import asyncio
    import importlib

    module = importlib.import_module(module_name)
    for name, method in RETARGET.items():
        cls = getattr(module, name, None)
        if isinstance(cls, type) and hasattr(cls, method):
            setattr(cls, method, lambda self: asyncio.new_event_loop())


def _child(args: argparse.Namespace) -> int:
    import faulthandler
    import unittest
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    policy_class = _install(args.loop)
    out = open(args.results, "a", buffering=1)
    done = set(args.skip_file and Path(args.skip_file).read_text().split() or ())

    module = f"test.test_asyncio.{args.child}"
    if args.retarget:
        _retarget(module)
    suite = unittest.defaultTestLoader.loadTestsFromName(module)

    def flatten(s: Any) -> list[Any]:
        items = []
        for t in s:
            if isinstance(t, unittest.TestSuite):
                items.extend(flatten(t))
            else:
                items.append(t)
        return items

    class Recorder(unittest.TestResult):
        # 3.12 reports a test skipped with its whole class without calling startTest
        _made = 0
        _outcome = "passed"
        _detail = ""

        def startTest(self, test: Any) -> None:
            super().startTest(test)
            self._made = policy_class.loops_made
            self._outcome = "passed"
            self._detail = ""
            out.write(json.dumps({"start": test.id()}) + "\n")
            faulthandler.dump_traceback_later(args.test_timeout, exit=True, file=sys.stderr)

        def _set(self, outcome: str, detail: str = "") -> None:
            # A failing subtest or a later error outranks a pass.
            if self._outcome in ("passed", "skipped") or outcome in ("error",):
                self._outcome, self._detail = outcome, detail

        def addError(self, test: Any, err: Any) -> None:
            super().addError(test, err)
            self._set("error", self._exc_info_to_string(err, test))

        def addFailure(self, test: Any, err: Any) -> None:
            super().addFailure(test, err)
            self._set("failed", self._exc_info_to_string(err, test))

        def addSkip(self, test: Any, reason: str) -> None:
            super().addSkip(test, reason)
            self._set("skipped", reason)

        def addExpectedFailure(self, test: Any, err: Any) -> None:
            super().addExpectedFailure(test, err)
            self._set("xfail")

        def addUnexpectedSuccess(self, test: Any) -> None:
            super().addUnexpectedSuccess(test)
            self._set("xpass")

        def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
            super().addSubTest(test, subtest, err)
            if err is not None:
                failure = issubclass(err[0], test.failureException)
                self._set("failed" if failure else "error", self._exc_info_to_string(err, test))

        def stopTest(self, test: Any) -> None:
            faulthandler.cancel_dump_traceback_later()
            super().stopTest(test)
            record = {
                "test": test.id(),
                "outcome": self._outcome,
                "policy_loop": policy_class.loops_made > self._made,
                "detail": self._detail[-3000:],
            }
            out.write(json.dumps(record) + "\n")
            self._outcome, self._detail, self._made = "passed", "", policy_class.loops_made

    tests = [t for t in flatten(suite) if t.id() not in done]
    # Module and class fixtures (setUpModule, setUpClass) run as the suite does.
    suite = unittest.TestSuite(tests)
    suite.run(Recorder())
    out.write(json.dumps({"module_done": args.child}) + "\n")
    out.close()
    # Threads or loops left behind must not keep the child alive.
    os._exit(0)


# --------------------------------------------------------------- parent side


def _run_module(python: str, loop: str, module: str, args: argparse.Namespace) -> list[dict]:
    records: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp, "results.jsonl")
        skip = Path(tmp, "skip")
        for _attempt in range(50):
            skip.write_text("\n".join(records))
            cmd = [
                python,
                os.path.abspath(__file__),
                "--child",
                module,
                "--loop",
                loop,
                "--results",
                str(results),
                "--skip-file",
                str(skip),
                "--test-timeout",
                str(args.test_timeout),
            ] + (["--retarget"] if args.retarget else [])
            results.write_text("")
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
            try:
                proc = subprocess.run(
                    cmd,
                    env=env,
                    cwd=tmp,  # CPython's tests leave files such as @test_<pid>_tmp behind
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    timeout=args.module_timeout,
                    text=True,
                )
                stderr = proc.stderr
            except subprocess.TimeoutExpired as exc:
                stderr = (exc.stderr or b"").decode(errors="replace") if exc.stderr else ""
            running = None
            finished = False
            for line in results.read_text().splitlines():
                rec = json.loads(line)
                if "start" in rec:
                    running = rec["start"]
                elif "test" in rec:
                    records[rec["test"]] = rec
                    running = None
                elif "module_done" in rec:
                    finished = True
            if finished:
                break
            if running is None:
                # Died outside any test (import error, module fixture): nothing to resume.
                records[f"test.test_asyncio.{module}"] = {
                    "test": f"test.test_asyncio.{module}",
                    "outcome": "crash",
                    "policy_loop": False,
                    "detail": stderr[-3000:],
                }
                break
            hung = "Timeout (" in stderr
            records[running] = {
                "test": running,
                "outcome": "hang" if hung else "crash",
                "policy_loop": True,  # cannot tell; counted against the loop under test
                "detail": stderr[-3000:],
            }
    return list(records.values())


def _retargeted(test_id: str) -> bool:
    parts = test_id.split(".")
    return len(parts) > 3 and parts[3] in RETARGET


def _summarise(records: list[dict], policy_only: bool, subset: str = "any") -> Counter:
    """Counts of outcomes; subset "plain" leaves out the retargeted classes, "retargeted"
    keeps only them."""
    c: Counter = Counter()
    for r in records:
        if policy_only and not r["policy_loop"]:
            continue
        if subset != "any" and _retargeted(r["test"]) != (subset == "retargeted"):
            continue
        c[r["outcome"]] += 1
        c["run"] += 1
    return c


def _parent(args: argparse.Namespace) -> int:
    modules = args.modules or DEFAULT_MODULES
    loops = args.loop or ["uringloop"]
    all_results: dict[str, dict[str, list[dict]]] = {}
    started = time.monotonic()
    for loop in loops:
        all_results[loop] = {}
        for module in modules:
            t0 = time.monotonic()
            recs = _run_module(args.python or sys.executable, loop, module, args)
            all_results[loop][module] = recs
            c = _summarise(recs, policy_only=True)
            bad = c["failed"] + c["error"] + c["hang"] + c["crash"]
            print(
                f"{loop:10} {module:22} policy-loop tests {c['run']:4} "
                f"passed {c['passed']:4} not passed {bad:3}   ({time.monotonic() - t0:.0f}s)",
                flush=True,
            )
    print(f"total {time.monotonic() - started:.0f}s")
    version = subprocess.run(
        [args.python or sys.executable, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if args.json:
        Path(args.json).write_text(
            json.dumps({"python": version, "results": all_results}, indent=1)
        )
    report = _markdown(version, all_results, modules, args.retarget)
    if args.markdown:
        Path(args.markdown).write_text(report)
    print(report)
    if args.expect_pass:
        known = set()
        if args.known_failures:
            for line in Path(args.known_failures).read_text().splitlines():
                line = line.strip()
                if line.startswith("- `test."):
                    known.add(line.split("`")[1])
        unexpected = [
            r["test"]
            for recs in all_results[loops[-1]].values()
            for r in recs
            if r["policy_loop"]
            and r["outcome"] in ("failed", "error", "hang", "crash")
            and r["test"] not in known
        ]
        for name in unexpected:
            print(f"UNEXPECTED: {name}")
        return 1 if unexpected else 0
    return 0


def _markdown(
    version: str,
    all_results: dict[str, dict[str, list[dict]]],
    modules: list[str],
    retarget: bool = False,
) -> str:
    lines = [f"CPython {version} `test.test_asyncio`, modules: {len(modules)}", ""]
    if retarget:
        lines[0] += " (retargeted: epoll loop classes run on the policy's loop)"
    head = "| loop | tests | run | passed | failed | errors | hangs/crashes | skipped | pass rate |"
    tables = [("Policy-loop tests", True, "plain" if retarget else "any")]
    if retarget:
        tables.append(("Retargeted epoll-loop tests", True, "retargeted"))
    tables.append(("All tests", False, "any"))
    for title, policy_only, subset in tables:
        lines += [f"**{title}**", "", head, "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        for loop, per_module in all_results.items():
            recs = [r for rs in per_module.values() for r in rs]
            c = _summarise(recs, policy_only, subset)
            executed = c["run"] - c["skipped"]
            rate = (c["passed"] + c["xfail"]) / executed if executed else 0.0
            lines.append(
                f"| {loop} | {title.split()[0].lower()} | {c['run']} | {c['passed']} | "
                f"{c['failed']} | {c['error']} | {c['hang'] + c['crash']} | {c['skipped']} | "
                f"{rate:.1%} |"
            )
        lines.append("")
    for loop, per_module in all_results.items():
        bad = [
            r
            for rs in per_module.values()
            for r in rs
            if r["policy_loop"] and r["outcome"] in ("failed", "error", "hang", "crash")
        ]
        lines.append(f"**{loop}: policy-loop tests not passed ({len(bad)})**")
        lines.append("")
        for r in sorted(bad, key=lambda r: r["test"]):
            last = [x for x in r["detail"].strip().splitlines() if x.strip()]
            why = last[-1].strip()[:160] if last else ""
            lines.append(f"- `{r['test']}` ({r['outcome']}): {why}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--loop", action="append", choices=["asyncio", "uvloop", "uringloop"])
    p.add_argument("--modules", nargs="*")
    p.add_argument("--python", help="interpreter to run the tests with (default: this one)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--test-timeout", type=float, default=60.0)
    p.add_argument("--module-timeout", type=float, default=900.0)
    p.add_argument(
        "--expect-pass",
        action="store_true",
        help="exit 1 if a policy-loop test of the last --loop fails and is not in --known-failures",
    )
    p.add_argument(
        "--retarget",
        action="store_true",
        help="also run the loop-level classes that build an epoll SelectorEventLoop "
        "(test_events, test_sendfile, test_sock_lowlevel EPollEventLoopTests, "
        "test_server SelectorStartServerTests) on the policy's loop",
    )
    p.add_argument("--known-failures", help="a Markdown list of `test.id`s that may fail")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--skip-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.loop = args.loop[0] if args.loop else "uringloop"
        return _child(args)
    return _parent(args)


if __name__ == "__main__":
    sys.exit(main())
