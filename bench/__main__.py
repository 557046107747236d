"""Run the benchmarks: asyncio, uvloop and uringloop side by side, in one invocation.

usage: python -m bench [--quick] [--rounds N] [--seconds S] [--modes sock,protocol]
                       [--sizes 1024,16384] [--conns 16] [--loops asyncio,uvloop,uringloop]

Every cell runs the loops in alternating order (asyncio, uvloop, uringloop, asyncio, ...)
for several rounds and reports the median with min/max, and the ratio to uvloop's median
from the same invocation. The echo server runs pinned to CPU 0, the C load generator to
CPU 1. Results go to bench/results/<date>/ as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .loops import LOOPS

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_client() -> Path:
    BUILD.mkdir(exist_ok=True)
    exe = BUILD / "echo_client"
    src = HERE / "echo_client.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_micro(loop: str, scale: float) -> dict[str, float]:
    out = subprocess.run(
        pinned(0, [sys.executable, "-m", "bench.micro", f"--loop={loop}", f"--scale={scale}"]),
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_echo(client: Path, loop: str, mode: str, size: int, conns: int, seconds: float) -> dict:
    server = subprocess.Popen(
        pinned(0, [sys.executable, "-m", "bench.echo_server", f"--loop={loop}", f"--mode={mode}"]),
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    try:
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"{loop} {mode} server did not start: {line!r}")
        port = line.split()[1]
        argv = pinned(1, [str(client), "127.0.0.1", port, str(conns), str(size)])
        # warm-up, then the timed run
        subprocess.run([*argv, str(min(0.5, seconds / 4))], capture_output=True, check=True)
        cpu0 = cpu_seconds(server.pid)
        out = subprocess.run([*argv, str(seconds)], capture_output=True, text=True, check=True)
        cpu1 = cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    result = json.loads(out.stdout)
    result["server_cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(result["requests"], 1)
    return result


def run_bulk(loop: str, size: int, total: int) -> dict:
    sink = subprocess.Popen(
        pinned(1, [sys.executable, "-m", "bench.bulk", "--sink"]),
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    try:
        port = sink.stdout.readline().split()[1]
        out = subprocess.run(
            pinned(
                0,
                [
                    sys.executable,
                    "-m",
                    "bench.bulk",
                    f"--loop={loop}",
                    f"--size={size}",
                    f"--total={total}",
                    f"--port={port}",
                ],
            ),
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE.parent,
        )
        sink.stdout.readline()  # DONE
    finally:
        sink.terminate()
        sink.wait(10)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def environment() -> dict[str, str]:
    versions = {}
    for mod in ("uvloop", "uringloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:  # recorded, not hidden: a missing loop shows in the report
            versions[mod] = f"unavailable ({exc})"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        **versions,
    }


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="short runs (about two minutes)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--modes", default="sock,streams,protocol")
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--conns", default="16")
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--bulk-sizes", default="", help="e.g. 16384,65536,262144,1048576")
    ap.add_argument("--bulk-mib", type=int, default=512)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    loops = args.loops.split(",")
    modes = [m for m in args.modes.split(",") if m]
    sizes = [int(s) for s in args.sizes.split(",")]
    conns = [int(c) for c in args.conns.split(",")]
    client = build_client()
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    results: dict = {
        "environment": env,
        "rounds": rounds,
        "seconds": seconds,
        "micro": {},
        "echo": [],
    }
    lines = [
        "| benchmark | " + " | ".join(loops) + " | uringloop / uvloop | uringloop / asyncio |",
        "|---|" + "---|" * (len(loops) + 2),
    ]

    def add_row(name: str, per_loop: dict[str, list[float]], unit: str, higher_is_better=True):
        stats = {lp: summarize(v) for lp, v in per_loop.items()}
        med = {lp: s["median"] for lp, s in stats.items()}

        def ratio(a: str, b: str) -> str:
            if a not in med or b not in med or not med[b]:
                return "n/a"
            r = med[a] / med[b]
            return f"{r:.2f}x" if higher_is_better else f"{r:.2f}x (lower is better)"

        cells = [
            f"{med[lp]:,.0f} {unit} ({stats[lp]['min']:,.0f}-{stats[lp]['max']:,.0f})"
            for lp in loops
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {ratio('uringloop', 'uvloop')} | "
            f"{ratio('uringloop', 'asyncio')} |"
        )
        print(lines[-1], flush=True)
        return stats

    if not args.no_micro:
        samples: dict[str, dict[str, list[float]]] = {}
        for _ in range(rounds):
            for lp in loops:
                for key, value in run_micro(lp, 0.3 if args.quick else 1.0).items():
                    samples.setdefault(key, {}).setdefault(lp, []).append(value)
        for key, per_loop in samples.items():
            results["micro"][key] = add_row(key, per_loop, "/s")

    for mode in modes:
        for size in sizes:
            for c in conns:
                rps: dict[str, list[float]] = {}
                cpu: dict[str, list[float]] = {}
                p99: dict[str, list[float]] = {}
                for _ in range(rounds):
                    for lp in loops:
                        r = run_echo(client, lp, mode, size, c, seconds)
                        rps.setdefault(lp, []).append(r["rps"])
                        cpu.setdefault(lp, []).append(r["server_cpu_us_per_req"])
                        p99.setdefault(lp, []).append(r["p99_us"])
                name = f"echo {mode} {size} B x{c}"
                results["echo"].append(
                    {
                        "mode": mode,
                        "size": size,
                        "conns": c,
                        "rps": add_row(name + " req/s", rps, "req/s"),
                        "server_cpu_us_per_req": add_row(
                            name + " server CPU", cpu, "us/req", False
                        ),
                        "p99_us": add_row(name + " p99", p99, "us", False),
                    }
                )

    bulk_loops = [lp for lp in loops if lp != "uringloop"]
    if "uringloop" in loops:
        bulk_loops += ["uringloop-copy", "uringloop"]
    bulk_sizes = [int(s) for s in args.bulk_sizes.split(",") if s]
    if bulk_sizes:
        lines.extend(
            [
                "",
                "| bulk | " + " | ".join(bulk_loops) + " | zc / uvloop | zc / asyncio |",
                "|---|" + "---|" * (len(bulk_loops) + 2),
            ]
        )
    for size in bulk_sizes:
        rate: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for _ in range(rounds):
            for lp in bulk_loops:
                r = run_bulk(lp, size, args.bulk_mib << 20)
                rate.setdefault(lp, []).append(r["gbytes_per_s"] * 1000)
                cpu.setdefault(lp, []).append(r["cpu_s_per_gib"] * 1000)
        saved_loops = loops
        loops = bulk_loops
        results.setdefault("bulk", []).append(
            {
                "size": size,
                "mbytes_per_s": add_row(f"bulk send {size} B MB/s", rate, "MB/s"),
                "cpu_ms_per_gib": add_row(f"bulk send {size} B sender CPU", cpu, "ms/GiB", False),
            }
        )
        loops = saved_loops

    out_dir = args.out or HERE / "results" / datetime.date.today().isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    (out_dir / f"results-{stamp}.json").write_text(json.dumps(results, indent=2))
    cmd = "python -m bench " + " ".join(sys.argv[1:])
    (out_dir / f"results-{stamp}.md").write_text(
        f"# Benchmark results\n\n`{cmd}`\n\n"
        + ", ".join(f"{k}: {v}" for k, v in env.items())
        + f"\n\nmedian of {rounds} alternating rounds (min-max)\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(f"results written to {out_dir}/results-{stamp}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
