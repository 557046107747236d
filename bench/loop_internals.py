"""pyperformance's asyncio benchmarks, run under each loop.

The benchmark scripts ship with the `pyperformance` package (data-files/benchmarks/bm_*);
each is a pyperf program that gets its loop from asyncio's policy. A `sitecustomize`
module put on PYTHONPATH installs the policy named by BENCH_LOOP in every process pyperf
starts, and records the loop class each one really got, so a result is only reported
for the loop it claims to measure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# (name, benchmark directory, extra arguments)
BENCHMARKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("async_tree_none", "bm_async_tree", ("none",)),
    ("async_tree_io", "bm_async_tree", ("io",)),
    ("async_tree_memoization", "bm_async_tree", ("memoization",)),
    ("async_tree_cpu_io_mixed", "bm_async_tree", ("cpu_io_mixed",)),
    ("async_tree_io_tg", "bm_async_tree", ("io", "--task-groups")),
    ("asyncio_tcp", "bm_asyncio_tcp", ()),
    ("asyncio_websockets", "bm_asyncio_websockets", ()),
    ("coroutines", "bm_coroutines", ()),
    ("async_generators", "bm_async_generators", ()),
)
QUICK = ("async_tree_none", "asyncio_tcp")

SITECUSTOMIZE = """
import asyncio, os

_name = os.environ.get("BENCH_LOOP")
_record = os.environ.get("BENCH_LOOP_RECORD")
if _name == "uvloop":
    import uvloop
    _policy = uvloop.EventLoopPolicy()
elif _name == "rloop":
    import rloop
    _policy = rloop.EventLoopPolicy()
elif _name == "uringloop":
    import uringloop
    _policy = uringloop.EventLoopPolicy(fallback=False)
else:
    _policy = asyncio.DefaultEventLoopPolicy()
_make = _policy.new_event_loop


def _new_event_loop():
    loop = _make()
    if _record:
        with open(_record, "a") as f:
            f.write(type(loop).__module__ + "." + type(loop).__name__ + "\\n")
    return loop


_policy.new_event_loop = _new_event_loop
asyncio.set_event_loop_policy(_policy)
"""

EXPECTED_CLASS = {
    "asyncio": "asyncio.unix_events._UnixSelectorEventLoop",
    "uvloop": "uvloop.Loop",
    "rloop": "rloop.loop.RLoop",
    "uringloop": "uringloop._loop.UringEventLoop",
}


def benchmarks_dir() -> Path | None:
    try:
        import pyperformance
    except ImportError:
        return None
    path = Path(pyperformance.__file__).parent / "data-files" / "benchmarks"
    return path if path.is_dir() else None


def available(names: tuple[str, ...]) -> list[tuple[str, str, tuple[str, ...]]]:
    root = benchmarks_dir()
    if root is None:
        return []
    return [b for b in BENCHMARKS if b[0] in names and (root / b[1]).is_dir()]


def run(name: str, loop: str, quick: bool, cpu: int | None = 0) -> float:
    """Mean seconds of one benchmark run under `loop` (pyperf's own repetitions)."""
    bench = next(b for b in BENCHMARKS if b[0] == name)
    script = benchmarks_dir() / bench[1] / "run_benchmark.py"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "sitecustomize.py").write_text(SITECUSTOMIZE)
        record = Path(tmp, "loops.txt")
        out = Path(tmp, "result.json")
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH")])),
            BENCH_LOOP=loop,
            BENCH_LOOP_RECORD=str(record),
        )
        argv = [
            sys.executable,
            str(script),
            *bench[2],
            "--quiet",
            "--inherit-environ=PYTHONPATH,BENCH_LOOP,BENCH_LOOP_RECORD",
            "-o",
            str(out),
        ]
        argv += ["-p", "1", "-n", "3", "-w", "1"] if quick else ["--fast"]
        if cpu is not None:
            argv.append(f"--affinity={cpu}")
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} on {loop} failed: {proc.stderr[-2000:]}")
        got = set(record.read_text().split()) if record.exists() else set()
        if name != "coroutines" and got != {EXPECTED_CLASS[loop]}:
            # (coroutines drives its coroutine by hand and never makes a loop)
            raise RuntimeError(f"{name} under {loop} ran on {sorted(got) or 'no loop'}")
        data = json.loads(out.read_text())
    values = [v for run in data["benchmarks"][0]["runs"] for v in run.get("values", [])]
    return sum(values) / len(values)
