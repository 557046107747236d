"""aiohttp's own functional tests, on asyncio's loop and on uringloop, compared test by test.

    .venv-main/bin/python tests/peer_suites.py            # the full set of modules
    .venv-main/bin/python tests/peer_suites.py --slice    # the slice of CI (which adds
                                                          # --reference-when-failing)
    .venv-main/bin/python tests/peer_suites.py --modules test_web_websocket_functional \\
        -k stalled --loop asyncio --loop uringloop --loop uvloop

What it does:
1. Reads the aiohttp version installed where this script runs (the one our own tests and
   benchmarks use) and downloads that version's sdist with ``pip download --no-binary``
   into build/suites/ (kept, and reused when present), then unpacks it there.
2. Makes a venv of its own, .venv-suites, from this interpreter: aiohttp (that version,
   from its wheel), the test requirements aiohttp's functional tests need, pinned by the
   sdist's requirements/constraints.txt, and a .pth file that puts this checkout on
   sys.path. uringloop is not pip-installed there: ``pip install -e`` would rebuild the
   extension modules in this working tree, a plain install would copy a snapshot that
   goes stale at the next edit; the .pth uses the tree as .venv-main's in-place build
   left it (same interpreter, so the same ABI). Rebuild that as usual after native/
   changes. The venv is remade when the interpreter, aiohttp's version or the list of
   requirements changes.
3. Runs the chosen test modules of the sdist, their files untouched, once per loop,
   each in its own pytest process: tests/peer_suites_plugin.py (``-p``) adds
   ``uringloop`` to the choices of aiohttp's ``--aiohttp-loop``, checks that every test's
   ``loop`` fixture made a loop of the type its id names, checks that a uringloop loop
   gives back everything it lent the kernel, and keeps only the tests that take the
   ``loop`` fixture (the others run on loops of their own making, the same on every run).
   aiohttp's pytest.ini applies (filterwarnings = error, markers, timeout = 120,
   xfail_strict) but for its addopts (xdist, coverage, doctests), replaced by ours.
4. Prints, per module and loop, the counts of passed, failed, errors, skipped, xfailed
   and xpassed tests, then the tests that fail on uringloop and pass on asyncio's loop.
   Exit status 1 when there is such a test that tests/peer_suites_known.md does not list
   (as ``- `tests/test_x.py::test_name` reason``, the node id without the loop's id), or
   when a run dies, collects nothing or ends with a pytest error.

Logs and per-test results (JSON lines) go to build/suites/results/.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

# The sdist's tests/*_functional.py, and the other modules whose tests run servers and
# clients over real sockets on the loop fixture.
FULL_MODULES = [
    "test_client_functional",
    "test_web_functional",
    "test_web_websocket_functional",
    "test_client_ws_functional",
    "test_web_sendfile_functional",
    "test_proxy_functional",
    "test_web_server",
    "test_web_urldispatcher",
    "test_web_middleware",
    "test_client_middleware",
    "test_client_middleware_digest_auth",
    "test_web_runner",
    "test_web_log",
    "test_client_session",
    "test_connector",
]

# CI's slice: the websocket modules (frames both ways, close and abort from either side,
# heartbeats, a stalled parser), sendfile and the server's functional tests whole, and
# the client's streaming, chunked, keep-alive, timeout and connection-loss tests.
SLICE_MODULES = [
    "test_web_websocket_functional",
    "test_client_ws_functional",
    "test_web_sendfile_functional",
    "test_web_functional",
    "test_client_functional",
]
SLICE_K = {
    "test_client_functional": "stream or chunked or keepalive or keep_alive or timeout or "
    "close or disconnect or abort or large or read or eof or payload or upload",
}

# aiohttp's own loop names for the loops this script knows
LOOP_IDS = {"asyncio": "pyloop", "uringloop": "uringloop", "uvloop": "uvloop"}

# What the functional modules import or use beyond aiohttp and its speedups: pytest and
# the plugins its pytest.ini and conftest.py expect (pytest-timeout for `timeout`,
# coverage for a warning filter, blockbuster's autouse fixture, trustme's certificates),
# freezegun, pytest-mock, proxy.py for test_proxy_functional, the two zlib back ends
# its compression tests are parametrized over, uvloop (aiohttp's own loop choice) and
# cffi for uringloop itself.
REQUIREMENTS = [
    "aiodns",
    "brotli",
    "backports-zstd",
    "pytest",
    "pytest-timeout",
    "pytest-mock",
    "coverage",
    "blockbuster",
    "trustme",
    "freezegun",
    "proxy.py",
    "isal",
    "zlib-ng",
    "uvloop",
    "cffi",
]

OUTCOMES = ["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
BAD = {"failed", "error", "crashed", "missing"}


def log(message: str) -> None:
    print(f"[peer-suites] {message}", flush=True)


def aiohttp_version(override: str | None) -> str:
    if override:
        return override
    try:
        return importlib.metadata.version("aiohttp")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"aiohttp is not installed for {sys.executable}: run this script with the "
            "project's venv (.venv-main/bin/python), or name a version with --aiohttp"
        ) from None


def fetch_sdist(version: str, cache: Path, name: str = "aiohttp") -> Path:
    """The unpacked sdist of `name` `version` in `cache` (with its tests/conftest.py or
    tests/__init__.py), downloaded when missing."""
    source = cache / f"{name}-{version}"

    def has_tests() -> bool:
        return any((source / "tests" / f).is_file() for f in ("conftest.py", "__init__.py"))

    if has_tests():
        return source
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"{name}-{version}.tar.gz"
    if not archive.is_file():
        log(f"downloading the sdist of {name} {version}")
        run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:"]
            + ["--no-deps", "--dest", str(cache), f"{name}=={version}"]
        )
        if not archive.is_file():
            raise SystemExit(f"pip download left no {archive}")
    log(f"unpacking {archive.name}")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cache, filter="data")
        else:  # an interpreter without the extraction filters (before 3.11.4)
            tar.extractall(cache)  # PyPI's own sdist
    if not has_tests():
        raise SystemExit(f"{archive} holds no tests/ package under {name}-{version}/")
    return source


def run(cmd: list[str], **kwargs) -> None:
    result = subprocess.run(cmd, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}")


def make_venv(venv: Path, version: str, source: Path) -> Path:
    """The venv's python, with aiohttp `version`, the test requirements and this tree."""
    python = venv / "bin" / "python"
    key = {
        "python": sys.version,
        "base": getattr(sys, "_base_executable", sys.executable),
        "aiohttp": version,
        "requirements": REQUIREMENTS,
        "tree": str(ROOT),
    }
    marker = venv / "peer-suites.json"
    if python.exists() and marker.is_file() and json.loads(marker.read_text()) == key:
        return python
    log(f"making {venv} (aiohttp {version} and its test requirements)")
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    constraints = source / "requirements" / "constraints.txt"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if constraints.is_file():
        pip += ["-c", str(constraints)]
    run(pip + [f"aiohttp=={version}"] + REQUIREMENTS)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "uringloop-tree.pth").write_text(f"{ROOT}\n")
    marker.write_text(json.dumps(key))
    return python


def check_venv(python: Path) -> None:
    """uringloop imports in the venv from this tree, and its ring opens."""
    probe = (
        "import uringloop, aiohttp; loop = uringloop.new_event_loop(); loop.close(); "
        "print(uringloop.__file__, aiohttp.__version__)"
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"uringloop does not load in {python}:\n{result.stderr.strip()}\n"
            "(build it in place first: .venv-main/bin/python setup.py -q build_ext --inplace)"
        )
    where = result.stdout.split()[0]
    if not where.startswith(str(ROOT) + os.sep):
        raise SystemExit(f"{python} imports uringloop from {where}, not from {ROOT}")


def selection(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(module, -k expression or None) for each module to run."""
    if args.modules:
        return [(m.removesuffix(".py"), args.k) for m in args.modules]
    if args.slice:
        return [(m, args.k or SLICE_K.get(m)) for m in SLICE_MODULES]
    return [(m, args.k) for m in FULL_MODULES]


def run_loop(
    python: Path, source: Path, loop: str, modules: list[tuple[str, str | None]], args
) -> dict:
    """One pytest process per module on `loop`; the results of them all."""
    out = args.cache / "results"
    out.mkdir(parents=True, exist_ok=True)
    plugins = args.cache / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "peer_suites_plugin.py"
    if not link.is_symlink() or link.resolve() != HERE / "peer_suites_plugin.py":
        link.unlink(missing_ok=True)
        link.symlink_to(HERE / "peer_suites_plugin.py")
    env = {**os.environ, "PYTHONPATH": str(plugins), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    results: dict[str, dict] = {}
    problems: list[str] = []
    started = time.monotonic()
    for module, k in modules:
        path = source / "tests" / f"{module}.py"
        if not path.is_file():
            raise SystemExit(f"no {path.relative_to(args.cache)} in aiohttp's sdist")
        stem = f"{loop}-{module}"
        jsonl, logfile = out / f"{stem}.jsonl", out / f"{stem}.log"
        cmd = [
            # the pytest script, not `python -m pytest`: with the sdist as cwd, -m would put
            # the sdist's uncompiled aiohttp/ ahead of the installed wheel
            str(python.parent / "pytest"),
            "-o",
            "addopts=",
            "-p",
            "peer_suites_plugin",
            "-p",
            "no:cacheprovider",
            f"--aiohttp-loop={LOOP_IDS[loop]}",
            "-m",
            "not dev_mode and not autobahn and not internal",
            f"--timeout={args.timeout}",
            f"--peer-results={jsonl}",
            "-q",
            "-rfE",
            "--tb=short",
        ]
        if args.all_tests:
            cmd.append("--peer-all-tests")
        if k:
            cmd += ["-k", k]
        cmd.append(f"tests/{module}.py")
        t0 = time.monotonic()
        with open(logfile, "w") as f:
            f.write(" ".join(cmd) + "\n\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=source, env=env, stdout=f, stderr=subprocess.STDOUT)
        took = time.monotonic() - t0
        got, problem = read_results(jsonl, proc.returncode, f"{loop} {module}", LOOP_IDS[loop])
        results.update(got)
        counts = Counter(r["outcome"] for r in got.values())
        summary = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES + ["crashed"] if counts[o])
        log(f"{loop:9} {module:36} {summary or 'no tests'} ({took:.0f} s, {logfile.name})")
        if problem:
            problems.append(problem)
            log(f"  {problem}")
    return {
        "results": results,
        "problems": problems,
        "seconds": time.monotonic() - started,
    }


def read_results(
    jsonl: Path, returncode: int, what: str, loop_id: str
) -> tuple[dict[str, dict], str | None]:
    results: dict[str, dict] = {}
    started: str | None = None
    finished = False
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run that died mid-write
                continue
            if record["kind"] == "start":
                started = record["nodeid"]
            elif record["kind"] == "result":
                results[record["nodeid"]] = record
                started = None
            elif record["kind"] == "finish":
                finished = True
    problem = None
    if returncode < 0 or not finished:
        how = (
            f"killed by {signal.Signals(-returncode).name}"
            if returncode < 0
            else f"exit status {returncode} without finishing"
        )
        problem = f"{what}: pytest {how}" + (f", in {started}" if started else "")
        if started:
            results[started] = {
                "nodeid": started,
                "test": without_loop_id(started, loop_id),
                "loop": loop_id,
                "outcome": "crashed",
                "message": how,
            }
    elif returncode not in (0, 1):
        problem = f"{what}: pytest exit status {returncode} (see its log)"
    elif not results:
        problem = f"{what}: no tests ran"
    else:
        other = [r["nodeid"] for r in results.values() if r["loop"] != loop_id]
        if other:
            problem = f"{what}: {len(other)} tests not on [{loop_id}], e.g. {other[0]}"
    return results, problem


def without_loop_id(nodeid: str, loop_id: str) -> str:
    """The node id with the loop's id taken out of its parameter ids (as the plugin's
    results give it)."""
    head, bracket, params = nodeid.partition("[")
    if not bracket or not params.endswith("]"):
        return nodeid
    parts = params[:-1].split("-")
    if loop_id in parts:
        parts.remove(loop_id)
    return f"{head}[{'-'.join(parts)}]" if parts else head


def table(runs: dict[str, dict], modules: list[str]) -> str:
    cols = ["tests"] + OUTCOMES + ["crashed"]
    lines = [
        "| module | loop | " + " | ".join(cols) + " |",
        "|---|---|" + "--:|" * len(cols),
    ]
    totals = {loop: Counter() for loop in runs}
    for module in modules:
        for loop, run in runs.items():
            counts = Counter(
                r["outcome"]
                for r in run["results"].values()
                if r["nodeid"].startswith(f"tests/{module}.py::")
            )
            totals[loop].update(counts)
            cells = [sum(counts.values())] + [counts[o] for o in cols[1:]]
            lines.append(f"| {module} | {loop} | " + " | ".join(map(str, cells)) + " |")
    for loop, counts in totals.items():
        cells = [sum(counts.values())] + [counts[o] for o in cols[1:]]
        lines.append(f"| **all** | {loop} | " + " | ".join(f"**{c}**" for c in cells) + " |")
    return "\n".join(lines)


def read_known(path: Path) -> dict[str, str]:
    known = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("- `tests/"):
                test, _, reason = line[3:].partition("`")
                known[test] = reason.strip(" -—:")
    return known


def compare(reference: dict, judged: dict) -> tuple[list[dict], list[dict]]:
    """(tests bad on `judged` and passed on `reference`, and the other way round)."""
    ref = {r["test"]: r for r in reference["results"].values()}
    got = {r["test"]: r for r in judged["results"].values()}
    worse = [
        got[t]
        for t in got
        if got[t]["outcome"] in BAD and ref.get(t, {}).get("outcome") == "passed"
    ]
    worse += [
        {**ref[t], "outcome": "missing", "message": "not run"}
        for t in ref
        if t not in got and ref[t]["outcome"] == "passed"
    ]
    better = [
        ref[t]
        for t in ref
        if ref[t]["outcome"] in BAD and got.get(t, {}).get("outcome") == "passed"
    ]
    return worse, better


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--slice",
        action="store_true",
        help="CI's slice: the websocket, sendfile and server functional modules whole and "
        "the client's streaming, keep-alive, timeout and connection-loss tests",
    )
    p.add_argument(
        "--modules",
        nargs="+",
        metavar="MODULE",
        help=f"test modules of aiohttp's tests/ (default: {' '.join(FULL_MODULES)})",
    )
    p.add_argument("-k", metavar="EXPR", help="pytest's -k, for every module")
    p.add_argument(
        "--loop",
        action="append",
        choices=list(LOOP_IDS),
        help="loops to run on, in this order (default: asyncio uringloop); the first is "
        "the reference uringloop is judged against",
    )
    p.add_argument(
        "--known",
        type=Path,
        default=HERE / "peer_suites_known.md",
        help="Markdown list of the `tests/...::test` node ids uringloop may fail "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--aiohttp", metavar="VERSION", help="aiohttp version (default: the installed one)"
    )
    p.add_argument(
        "--cache", type=Path, default=ROOT / "build" / "suites", help="default: %(default)s"
    )
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-suites", help="default: %(default)s")
    p.add_argument("--timeout", type=int, default=120, help="seconds per test (default: 120)")
    p.add_argument(
        "--all-tests",
        action="store_true",
        help="also run the tests that do not take the loop fixture",
    )
    p.add_argument(
        "--reference-when-failing",
        action="store_true",
        help="run uringloop first, and the reference loop only on the modules where a test "
        "failed on uringloop (CI: a clean run needs no reference)",
    )
    p.add_argument("--json", type=Path, help="write every run's results here")
    args = p.parse_args(argv)
    loops = args.loop or ["asyncio", "uringloop"]
    if "uringloop" not in loops:
        p.error("--loop: uringloop is the loop being judged")
    if len(loops) < 2:
        p.error("--loop: name a reference loop too (asyncio)")

    t0 = time.monotonic()
    version = aiohttp_version(args.aiohttp)
    source = fetch_sdist(version, args.cache)
    python = make_venv(args.venv, version, source)
    check_venv(python)
    chosen = selection(args)
    log(f"aiohttp {version}, {len(chosen)} modules, loops: {', '.join(loops)}")

    if args.reference_when_failing:
        judged = run_loop(python, source, "uringloop", chosen, args)
        failing = {
            r["nodeid"].partition("::")[0]
            for r in judged["results"].values()
            if r["outcome"] in BAD
        }
        again = [(m, k) for m, k in chosen if f"tests/{m}.py" in failing]
        runs = {
            loop: run_loop(python, source, loop, again, args)
            if again
            else {"results": {}, "problems": [], "seconds": 0.0}
            for loop in loops
            if loop != "uringloop"
        }
        if not again:
            log(f"nothing failed on uringloop: {', '.join(runs)} not run")
        runs["uringloop"] = judged
    else:
        runs = {loop: run_loop(python, source, loop, chosen, args) for loop in loops}
    modules = [m for m, _ in chosen]
    print()
    print(table(runs, modules))
    print()
    for loop, run in runs.items():
        log(f"{loop}: {run['seconds']:.0f} s")

    reference = runs[loops[0]]
    worse, better = compare(reference, runs["uringloop"])
    known = read_known(args.known)
    unexpected = [r for r in worse if r["test"] not in known]
    if worse:
        print(f"\nFail on uringloop, pass on {loops[0]}:")
        for r in worse:
            tag = "known" if r["test"] in known else "NEW"
            print(f"  [{tag}] {r['nodeid']}: {r['outcome']}: {r['message']}")
    if better:
        print(f"\nPass on uringloop, fail on {loops[0]}:")
        for r in better:
            print(f"  {r['nodeid']}: {r['outcome']}: {r['message']}")
    passed = {r["test"] for r in runs["uringloop"]["results"].values() if r["outcome"] == "passed"}
    for test in sorted(set(known) & passed):
        print(f"\nlisted in {args.known.name}, passed this time: {test}")
    problems = [prob for run in runs.values() for prob in run["problems"]]
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "aiohttp": version,
                    "python": sys.version.split()[0],
                    "modules": chosen,
                    "runs": {
                        loop: {"seconds": run["seconds"], "results": list(run["results"].values())}
                        for loop, run in runs.items()
                    },
                },
                indent=1,
            )
        )
    log(f"total {time.monotonic() - t0:.0f} s")
    return 1 if unexpected or problems else 0


if __name__ == "__main__":
    sys.exit(main())
