"""Run the benchmarks: asyncio, uvloop and uringloop side by side, in one invocation.

usage: python -m bench [--quick] [--rounds N] [--seconds S] [--modes sock,streams,protocol]
                       [--sizes 1024,16384,262144] [--conns 1,16,128]
                       [--loops asyncio,uvloop,uringloop] [--no-micro] [--no-reference]
                       [--bulk-sizes 16384,65536,262144,1048576] [--udp-sizes 16384,65000]
                       [--bulk-mib 512] [--udp-mib 2048] [--out DIR]

Every cell runs the loops in alternating order (asyncio, uvloop, uringloop, asyncio, ...)
for several rounds and reports the median with min/max, and ratios between medians of
the same invocation. The echo server runs pinned to CPU 0, the C load generator to CPU 1;
each echo table also has the C echo server on liburing (bench/ring_echo_server.c) as the
ceiling. Bulk sends run the sender on CPU 0: over loopback TCP to a sink on CPU 1, and as
UDP into a dead-end veth in a network namespace made for the run (bench/netns.py), the
one place on a machine without a NIC where zero-copy really skips the copy.
Results go to bench/results/<date>/ as JSON and Markdown.
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

from . import bulk, netns
from .loops import LOOPS

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The C echo server on liburing: what the machine can do without Python.
REFERENCE = "c-liburing"


def build(name: str, libs: tuple[str, ...] = ()) -> Path:
    """Compile bench/<name>.c once (again when the source is newer)."""
    BUILD.mkdir(exist_ok=True)
    exe = BUILD / name
    src = HERE / f"{name}.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src), *libs], check=True)
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


def echo_server_argv(loop: str, mode: str) -> list[str]:
    if loop == REFERENCE:
        return [str(build("ring_echo_server", ("-luring",)))]
    return [sys.executable, "-m", "bench.echo_server", f"--loop={loop}", f"--mode={mode}"]


def run_echo(client: Path, loop: str, mode: str, size: int, conns: int, seconds: float) -> dict:
    server = subprocess.Popen(
        pinned(0, echo_server_argv(loop, mode)),
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
        server.stdout.close()
    result = json.loads(out.stdout)
    result["server_cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(result["requests"], 1)
    return result


def bulk_argv(variant: str, proto: str, size: int, total: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.bulk",
        f"--proto={proto}",
        f"--loop={variant}",
        f"--size={size}",
        f"--total={total}",
        *extra,
    ]


def run_bulk_tcp(variant: str, size: int, total: int) -> dict:
    sink = subprocess.Popen(
        pinned(1, [sys.executable, "-m", "bench.bulk", "--sink"]),
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    try:
        port = sink.stdout.readline().split()[1]
        out = subprocess.run(
            pinned(0, bulk_argv(variant, "tcp", size, total, [f"--port={port}"])),
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE.parent,
        )
        sink.stdout.readline()  # DONE
    finally:
        sink.terminate()
        sink.wait(10)
        sink.stdout.close()
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bulk_udp(namespace: str, variant: str, size: int, total: int) -> dict:
    argv = bulk_argv(variant, "udp", size, total, [f"--addr={netns.DEAD_END}"])
    out = subprocess.run(
        netns.in_namespace(namespace, pinned(0, argv)),
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    )
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


class Report:
    """Rows of medians (min-max) with ratios computed within this invocation."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def header(self, title: str, columns: list[str], ratios: list[tuple[str, str]]) -> None:
        self.columns, self.ratios = columns, ratios
        labels = [f"{a} / {b}" for a, b in ratios]
        self.lines += [
            "",
            f"| {title} | " + " | ".join(columns) + " | " + " | ".join(labels) + " |",
            "|---|" + "---|" * (len(columns) + len(ratios)),
        ]

    def row(self, name: str, per: dict[str, list[float]], unit: str, higher_is_better=True):
        stats = {k: summarize(v) for k, v in per.items()}
        med = {k: s["median"] for k, s in stats.items()}
        cells = [
            f"{med[c]:,.0f} {unit} ({stats[c]['min']:,.0f}-{stats[c]['max']:,.0f})"
            if c in med
            else "n/a"
            for c in self.columns
        ]
        for a, b in self.ratios:
            if a in med and b in med and med[b]:
                r = med[a] / med[b]
                cells.append(f"{r:.2f}x" + ("" if higher_is_better else " (lower is better)"))
            else:
                cells.append("n/a")
        self.lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(self.lines[-1], flush=True)
        return stats


def reference_server_available() -> bool:
    try:
        build("ring_echo_server", ("-luring",))
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


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
    ap.add_argument(
        "--no-reference", action="store_true", help="leave out the C liburing echo server"
    )
    ap.add_argument("--bulk-sizes", default="", help="TCP, e.g. 16384,65536,262144,1048576")
    ap.add_argument("--udp-sizes", default="", help="UDP to a dead-end veth, e.g. 16384,65000")
    ap.add_argument("--bulk-mib", type=int, default=512, help="MiB per TCP bulk run")
    ap.add_argument("--udp-mib", type=int, default=2048, help="MiB per UDP bulk run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    loops = args.loops.split(",")
    modes = [m for m in args.modes.split(",") if m]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    conns = [int(c) for c in args.conns.split(",") if c]
    client = build("echo_client")
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    results: dict = {"environment": env, "rounds": rounds, "seconds": seconds}
    results.update(micro={}, echo=[], bulk=[], notes=[])
    report = Report()

    def ratios_to(base: tuple[str, ...], cols: list[str]) -> list[tuple[str, str]]:
        return [(a, b) for a in ("uringloop", REFERENCE) for b in base if a in cols and b in cols]

    if not args.no_micro:
        report.header("loop micro-benchmark", loops, ratios_to(("uvloop", "asyncio"), loops))
        samples: dict[str, dict[str, list[float]]] = {}
        for _ in range(rounds):
            for lp in loops:
                for key, value in run_micro(lp, 0.3 if args.quick else 1.0).items():
                    samples.setdefault(key, {}).setdefault(lp, []).append(value)
        for key, per_loop in samples.items():
            results["micro"][key] = report.row(key, per_loop, "/s")

    servers = list(loops)
    if not args.no_reference and modes and sizes and conns:
        if reference_server_available():
            servers.append(REFERENCE)
        else:
            results["notes"].append("C reference server not built (gcc or liburing missing)")
    if modes and sizes and conns:
        report.header("echo", servers, ratios_to(("uvloop", "asyncio"), servers))
    for mode in modes:
        for size in sizes:
            for c in conns:
                rps: dict[str, list[float]] = {}
                cpu: dict[str, list[float]] = {}
                p99: dict[str, list[float]] = {}
                for _ in range(rounds):
                    for lp in servers:
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
                        "rps": report.row(name + " req/s", rps, "req/s"),
                        "server_cpu_us_per_req": report.row(
                            name + " server CPU", cpu, "us/req", False
                        ),
                        "p99_us": report.row(name + " p99", p99, "us", False),
                    }
                )

    variants = [v for v in bulk.VARIANTS if v.split("-")[0] in loops]
    bulk_ratios = [
        (a, b)
        for a, b in (
            ("uringloop", "uringloop-copy"),
            ("uringloop-fixed", "uringloop-copy"),
            ("uringloop-fixed-copy", "uringloop-copy"),
            ("uringloop", "uvloop"),
            ("uringloop-fixed", "uvloop"),
        )
        if a in variants and b in variants
    ]
    total = args.bulk_mib << 20

    def bulk_rows(proto: str, size: int, runner) -> None:
        rate: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        kernel: dict[str, list[float]] = {}
        for _ in range(rounds):
            for v in variants:
                r = runner(v)
                rate.setdefault(v, []).append(r["gbytes_per_s"] * 1000)
                cpu.setdefault(v, []).append(r["cpu_s_per_gib"] * 1000)
                kernel.setdefault(v, []).append(r["kernel_cpu_s_per_gib"] * 1000)
        name = f"bulk {proto} {size} B writes"
        results["bulk"].append(
            {
                "proto": proto,
                "size": size,
                "mbytes_per_s": report.row(name + " MB/s", rate, "MB/s"),
                "cpu_ms_per_gib": report.row(name + " sender CPU", cpu, "ms/GiB", False),
                "kernel_cpu_ms_per_gib": report.row(
                    name + " sender kernel CPU", kernel, "ms/GiB", False
                ),
            }
        )

    tcp_sizes = [int(s) for s in args.bulk_sizes.split(",") if s]
    if tcp_sizes:
        report.header("bulk send, loopback TCP", variants, bulk_ratios)
    for size in tcp_sizes:
        bulk_rows("tcp", size, lambda v, size=size: run_bulk_tcp(v, size, total))

    udp_sizes = [int(s) for s in args.udp_sizes.split(",") if s]
    if udp_sizes:
        reason = netns.unavailable_reason()
        if reason:
            print(f"UDP bulk skipped: {reason}", flush=True)
            results["notes"].append(f"UDP bulk skipped: {reason}")
        else:
            report.header("bulk send, UDP into a dead-end veth", variants, bulk_ratios)
            udp_total = args.udp_mib << 20
            with netns.dead_end_namespace() as ns:
                for size in udp_sizes:
                    bulk_rows(
                        "udp", size, lambda v, size=size: run_bulk_udp(ns, v, size, udp_total)
                    )

    out_dir = args.out or HERE / "results" / datetime.date.today().isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    (out_dir / f"results-{stamp}.json").write_text(json.dumps(results, indent=2))
    cmd = "python -m bench " + " ".join(sys.argv[1:])
    (out_dir / f"results-{stamp}.md").write_text(
        f"# Benchmark results\n\n`{cmd}`\n\n"
        + ", ".join(f"{k}: {v}" for k, v in env.items())
        + f"\n\nmedian of {rounds} alternating rounds (min-max); server (or sender) on CPU 0,"
        + " load generator (or sink) on CPU 1\n"
        + "\n".join(report.lines)
        + "\n"
        + "".join(f"\n{n}\n" for n in results["notes"])
    )
    print(f"results written to {out_dir}/results-{stamp}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
