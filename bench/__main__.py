"""Run the benchmarks: asyncio, uvloop, rloop and uringloop side by side, in one invocation.

usage: python -m bench [--quick] [--only micro,echo,udp,http,clients,bulk,internals] [--rounds N]
                       [--seconds S] [--modes sock,streams,protocol] [--sizes 1024,16384,262144]
                       [--conns 1,16,128] [--udp-echo-sizes 1024,16384] [--udp-echo-clients 16,128]
                       [--loops asyncio,uvloop,rloop,uringloop] [--no-reference]
                       [--http-servers aiohttp,uvicorn,hypercorn] [--http-conns 16,128]
                       [--clients pg-select:1,pg-select:16,...]
                       [--proxy-sizes 16384,262144,1048576] [--proxy-conns 1,16]
                       [--bulk-sizes 4096,...] [--udp-sizes 4096,...] [--bulk-mib 512]
                       [--udp-mib 1024] [--internals async_tree_none,...]
                       [--churn-cycles 100000] [--churn-size 4096] [--churn-conc 4] [--out DIR]

`make bench` runs everything (about an hour); `--quick` a small slice of each part in
about two minutes. Every cell runs the loops in alternating order (asyncio, uvloop,
rloop, uringloop, asyncio, ...) for several rounds after a warm-up, and reports the median with
min/max and ratios between medians of the same invocation.

- micro: call_soon, task switches, timers (bench/micro.py).
- echo: our echo server in sock_*, streams and protocol modes, driven by a C load
  generator (bench/echo_client.c); the C echo server on liburing (bench/ring_echo_server.c)
  is in every table as the ceiling, and shows the load generator is not the bottleneck.
- udp: a UDP echo server (bench/udp_echo_server.py: create_datagram_endpoint, sendto in
  datagram_received) driven by a C load generator (bench/udp_echo_client.c) whose clients
  each keep one datagram in flight; datagrams/s and server CPU per datagram, with the C
  UDP echo server on liburing (bench/ring_udp_echo_server.c) as the ceiling. A loop that
  cannot serve datagrams is n/a in the table and named in the notes.
- http: aiohttp and Starlette under uvicorn and hypercorn (bench/http_server.py) loaded by
  wrk: "Hello, World!" and a 1 MiB response.
- clients: asyncpg against PostgreSQL and redis-py's asyncio client (with hiredis)
  against redis-server, both servers started for the run on CPU 1 (bench/db_servers.py),
  the client on CPU 0 (bench/db_client.py): SELECT 1 round trips on 1 and 16
  connections, a fetch of 10,000 rows, SET/GET round trips on 1 and 16 connections and
  pipelines of 1,000 SETs; operations/s and the client's CPU per operation.
- proxy: a TCP proxy between the C echo load generator and the C echo server (both on
  CPU 1; the proxy on CPU 0): examples/tcp_proxy.py forwarding inside the kernel
  (loop.forward(), "uringloop-splice") and copying through data_received()/write() on
  uringloop, uvloop and asyncio; each request crosses it twice. Throughput and the
  proxy's CPU per GiB moved.
- bulk: one-way sends over loopback TCP and as UDP into a dead-end veth in a network
  namespace made for the run (bench/netns.py, needs root): throughput and the sender's CPU
  per GiB for copying, SEND_ZC of bytes and ZeroCopyBuffers.
- internals: pyperformance's asyncio benchmarks under each loop (bench/loop_internals.py).
- churn (only with --only=churn, not in the default run): a soak, not a comparison.
  --churn-cycles connect/echo/close cycles and as many connect/abort cycles against a
  uringloop streams server, from a uringloop client in the same process and from a C
  client (bench/churn_client.c); the server's fds, RSS, buffer-ring buffers out,
  registered-pool and SEND_ZC bytes, requests in flight, op records, tasks and
  transports, sampled every 2% of the run (bench/churn.py). A table of baseline (after
  a warm-up), final and max values, a plot of each counter against cycles, and a FAIL
  line (exit status 1) for a counter that ends above its baseline by more than its slack.

Servers and senders run on CPU 0, load generators and sinks on CPU 1. Results go to
bench/results/<date>/results-<time>.{json,md} with PNG plots beside them.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import bulk, churn, db_servers, loop_internals, netns, runners
from .loops import LOOPS
from .report import Report, environment, progress, write

HERE = Path(__file__).resolve().parent
PARTS = ("micro", "echo", "udp", "http", "clients", "proxy", "bulk", "internals")
EXTRA_PARTS = ("churn",)  # only when named in --only

FULL = {
    "rounds": 5,
    "seconds": 3.0,
    "modes": "sock,streams,protocol",
    "sizes": "1024,16384,262144",
    "conns": "1,16,128",
    "udp_echo_sizes": "1024,16384",
    "udp_echo_clients": "16,128",
    "http_servers": "aiohttp,uvicorn,hypercorn",
    "http_conns": "16,128",
    "http_paths": "/,/1m",
    "clients": "pg-select:1,pg-select:16,pg-fetch:1,redis-get-set:1,redis-get-set:16,"
    "redis-pipeline:1",
    "proxy_sizes": "16384,262144,1048576",
    "proxy_conns": "1,16",
    "bulk_sizes": "4096,16384,65536,262144,1048576,4194304",
    "udp_sizes": "4096,16384,32768,65000",
    "file_sizes": "1048576,67108864",
    "bulk_mib": 512,
    "udp_mib": 1024,
    "internals": ",".join(b[0] for b in loop_internals.BENCHMARKS),
    "churn_cycles": 100000,
    "churn_size": 4096,
    "churn_conc": 4,
}
QUICK = {
    "rounds": 3,
    "seconds": 0.5,
    "modes": "protocol",
    "sizes": "1024,262144",
    "conns": "16",
    "udp_echo_sizes": "1024",
    "udp_echo_clients": "16",
    "http_servers": "aiohttp,uvicorn",
    "http_conns": "64",
    "http_paths": "/",
    "clients": "pg-select:16,redis-get-set:16",
    "proxy_sizes": "262144",
    "proxy_conns": "1",
    "bulk_sizes": "65536",
    "udp_sizes": "65000",
    "file_sizes": "16777216",
    "bulk_mib": 64,
    "udp_mib": 64,
    "internals": ",".join(loop_internals.QUICK),
    "churn_cycles": 10000,
    "churn_size": 4096,
    "churn_conc": 4,
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="a slice of each part, ~2 minutes")
    ap.add_argument(
        "--only", default=",".join(PARTS), help="parts to run: " + ",".join(PARTS + EXTRA_PARTS)
    )
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float, help="timed seconds per echo/UDP/HTTP run")
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--no-reference", action="store_true", help="no C liburing echo servers")
    for key in FULL:
        if key not in ("rounds", "seconds"):
            ap.add_argument("--" + key.replace("_", "-"), type=type(FULL[key]))
    ap.add_argument("--no-micro", action="store_true", help="same as leaving micro out of --only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p for p in words(args.only) if not (p == "micro" and args.no_micro)]
    unknown = set(args.parts) - set(PARTS + EXTRA_PARTS)
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_args()
    loops = words(args.loops)
    rounds = args.rounds
    env = environment()
    results: dict = {"environment": env, "rounds": rounds, "seconds": args.seconds}
    results.update(
        micro={},
        echo=[],
        udp=[],
        http=[],
        clients=[],
        proxy=[],
        bulk=[],
        internals={},
        churn=[],
        notes=[],
    )

    modes, sizes, conns = words(args.modes), ints(args.sizes), ints(args.conns)
    echo_servers = list(loops)
    if "echo" in args.parts and not args.no_reference:
        if runners.reference_server_available():
            echo_servers.append(runners.REFERENCE)
        else:
            results["notes"].append("C reference server not built (gcc or liburing missing)")
    udp_echo_sizes, udp_clients = ints(args.udp_echo_sizes), ints(args.udp_echo_clients)
    udp_servers = list(loops)
    if "udp" in args.parts and not args.no_reference:
        if runners.reference_server_available("ring_udp_echo_server"):
            udp_servers.append(runners.REFERENCE)
        else:
            results["notes"].append("C UDP reference server not built (gcc or liburing missing)")
    http_cells = [
        (server, path, c)
        for server in words(args.http_servers)
        for path in words(args.http_paths)
        for c in ints(args.http_conns)
    ]
    if "http" in args.parts and shutil.which("wrk") is None:
        results["notes"].append("HTTP skipped: wrk is not installed (apt-get install wrk)")
        args.parts.remove("http")
    client_cells = [(w, int(c)) for w, c in (cell.split(":") for cell in words(args.clients))]
    clients_reason = db_servers.unavailable_reason()
    if "clients" in args.parts and clients_reason:
        results["notes"].append(f"clients skipped: {clients_reason}")
        args.parts.remove("clients")
    proxy_cells = [(size, c) for size in ints(args.proxy_sizes) for c in ints(args.proxy_conns)]
    proxy_variants = [v for v in runners.PROXY_VARIANTS if v.split("-")[0] in loops]
    if "proxy" in args.parts and not runners.reference_server_available():
        results["notes"].append("proxy skipped: the C echo server (upstream) cannot be built")
        args.parts.remove("proxy")
    variants = [v for v in bulk.VARIANTS if v.split("-")[0] in loops]
    file_variants = [v for v in ("asyncio", "uvloop", "uringloop") if v in loops]
    udp_reason = netns.unavailable_reason()
    if "bulk" in args.parts and udp_reason and ints(args.udp_sizes):
        results["notes"].append(f"UDP bulk skipped: {udp_reason}")
    udp_sizes = [] if udp_reason else ints(args.udp_sizes)
    internals = loop_internals.available(tuple(words(args.internals)))
    if "internals" in args.parts and not internals:
        results["notes"].append("internals skipped: pyperformance is not installed")

    planned = {
        "micro": rounds * len(loops),
        "echo": rounds * len(modes) * len(sizes) * len(conns) * len(echo_servers),
        "udp": rounds * len(udp_echo_sizes) * len(udp_clients) * len(udp_servers),
        "http": rounds * len(http_cells) * len(loops),
        "clients": rounds * len(client_cells) * len(loops),
        "proxy": rounds * len(proxy_cells) * len(proxy_variants),
        "bulk": rounds * (len(ints(args.bulk_sizes)) + len(udp_sizes)) * len(variants)
        + rounds * len(ints(args.file_sizes)) * len(file_variants),
        "internals": len(internals) * len(loops),
        "churn": len(CHURN_SERIES)
        * (1 - (-args.churn_cycles // churn.sample_every(args.churn_cycles))),
    }
    bar = progress(sum(planned[p] for p in args.parts))
    report = Report(echo=bar.write)
    bar.write("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    def step(what: str) -> None:
        bar.set_description(what)

    def done() -> None:
        bar.update(1)

    # (key in a run's result, row label, unit, higher is better)
    echo_rows = (
        ("rps", "req/s", "req/s", True),
        ("server_cpu_us_per_req", "server CPU", "us/req", False),
        ("p50_us", "p50", "us", False),
        ("p99_us", "p99", "us", False),
    )

    def measure_cell(
        name: str, servers: list[str], run, rows=echo_rows, failed: dict | None = None
    ) -> dict:
        """Rounds of alternating servers under load: req/s, server CPU, p50 and p99 rows.

        With `failed` (server -> why), a server that says it cannot run, or fails twice, is
        recorded there and left out from then on (n/a in the table) instead of ending the run.
        """
        retry_on = (RuntimeError,) if failed is None else (RuntimeError, subprocess.SubprocessError)
        per: dict[str, dict[str, list[float]]] = {}
        for _ in range(rounds):
            for lp in servers:
                step(f"{name} {lp}")
                if failed is not None and lp in failed:
                    done()
                    continue
                try:
                    try:
                        r = run(lp)
                    except runners.Unsupported:
                        raise
                    except retry_on as exc:  # a run that finished no request: once more
                        print(f"\n{name} {lp}: {exc}; running it again", file=sys.stderr)
                        r = run(lp)
                except retry_on as exc:
                    if failed is None:
                        raise
                    failed[lp] = f"{name}: {exc}"
                    print(f"\n{name} {lp}: {exc}; leaving {lp} out", file=sys.stderr)
                    done()
                    continue
                for key, *_ in rows:
                    per.setdefault(key, {}).setdefault(lp, []).append(r[key])
                done()
        return {
            key: report.row(f"{name} {label}", per.get(key, {}), unit, higher)
            for key, label, unit, higher in rows
        }

    def ratios(cols: list[str], base=("uvloop", "rloop", "asyncio")) -> list[tuple[str, str]]:
        return [
            (a, b)
            for a in ("uringloop", runners.REFERENCE)
            for b in base
            if a in cols and b in cols
        ]

    if "micro" in args.parts:
        report.header("loop micro-benchmark", loops, ratios(loops))
        samples: dict[str, dict[str, list[float]]] = {}
        for _ in range(rounds):
            for lp in loops:
                step(f"micro {lp}")
                for key, value in runners.run_micro(lp, 0.3 if args.quick else 1.0).items():
                    samples.setdefault(key, {}).setdefault(lp, []).append(value)
                done()
        for key, per_loop in samples.items():
            results["micro"][key] = report.row(key, per_loop, "/s")

    if "echo" in args.parts and modes and sizes and conns:
        client = runners.build("echo_client")
        report.header("echo", echo_servers, ratios(echo_servers))
        for mode in modes:
            for size in sizes:
                for c in conns:
                    name = f"echo {mode} {size} B x{c}"
                    rows = measure_cell(
                        name,
                        echo_servers,
                        lambda lp, mode=mode, size=size, c=c: runners.run_echo(
                            client, lp, mode, size, c, args.seconds
                        ),
                    )
                    results["echo"].append({"mode": mode, "size": size, "conns": c, **rows})

    if "udp" in args.parts and udp_echo_sizes and udp_clients:
        client = runners.build("udp_echo_client")
        ref = runners.REFERENCE
        udp_ratios = [(a, "uvloop") for a in ("uringloop", "rloop", "asyncio")] + [
            (a, ref) for a in ("uringloop", "uvloop", "rloop", "asyncio")
        ]
        udp_ratios = [(a, b) for a, b in udp_ratios if a in udp_servers and b in udp_servers]
        report.header("UDP echo", udp_servers, udp_ratios)
        udp_rows = (
            ("dgram_per_s", "datagrams/s", "dgram/s", True),
            ("server_cpu_us_per_dgram", "server CPU", "us/dgram", False),
            ("p50_us", "p50", "us", False),
            ("p99_us", "p99", "us", False),
        )
        udp_failed: dict[str, str] = {}
        for size in udp_echo_sizes:
            for c in udp_clients:
                losses: dict[str, list[int]] = {}

                def run_udp(lp, size=size, c=c, losses=losses):
                    r = runners.run_udp_echo(client, lp, size, c, args.seconds)
                    losses.setdefault(lp, []).append(r["losses"])
                    return r

                name = f"udp echo {size} B x{c}"
                rows = measure_cell(name, udp_servers, run_udp, udp_rows, udp_failed)
                results["udp"].append({"size": size, "clients": c, **rows, "losses": losses})
                lost = {lp: sum(n) for lp, n in losses.items() if sum(n)}
                if lost:
                    results["notes"].append(
                        f"{name}: datagrams lost (resent after 200 ms): "
                        + ", ".join(f"{lp} {n}" for lp, n in lost.items())
                    )
        for lp, why in udp_failed.items():
            results["notes"].append(f"UDP echo: {lp} left out ({why})")

    if "http" in args.parts and http_cells:
        report.header("HTTP (wrk, 1 thread)", loops, ratios(loops))
        for server, path, c in http_cells:
            rows = measure_cell(
                f"{server} GET {path} x{c}",
                loops,
                lambda lp, server=server, path=path, c=c: runners.run_http(
                    lp, server, path, c, args.seconds
                ),
            )
            results["http"].append({"server": server, "path": path, "conns": c, **rows})

    if "clients" in args.parts and client_cells:
        report.header("database and cache clients (client on CPU 0)", loops, ratios(loops))
        client_rows = (
            ("ops_per_s", "ops/s", "ops/s", True),
            ("client_cpu_us_per_op", "client CPU", "us/op", False),
        )
        with db_servers.postgres() as pg, db_servers.redis() as rd:
            for work, c in client_cells:
                port = pg["port"] if work.startswith("pg-") else rd["port"]
                rows = measure_cell(
                    CLIENT_NAMES[work] + f" x{c}",
                    loops,
                    lambda lp, work=work, c=c, port=port: runners.run_db_client(
                        lp, work, c, args.seconds, port
                    ),
                    client_rows,
                )
                results["clients"].append({"work": work, "conns": c, **rows})

    if "proxy" in args.parts and proxy_cells:
        client = runners.build("echo_client")
        proxy_ratios = [
            (a, b)
            for a, b in (
                ("uringloop-splice", "uvloop-copy"),
                ("uringloop-splice", "uringloop-copy"),
                ("uringloop-splice", "asyncio-copy"),
                ("uringloop-copy", "uvloop-copy"),
            )
            if a in proxy_variants and b in proxy_variants
        ]
        report.header(
            "TCP proxy (C echo client -> proxy on CPU 0 -> C echo server)",
            proxy_variants,
            proxy_ratios,
        )
        proxy_rows = (
            ("mib_per_s", "throughput", "MiB/s", True),
            ("proxy_cpu_ms_per_gib", "proxy CPU", "ms/GiB", False),
            ("peers_cpu_ms_per_gib", "client + server CPU", "ms/GiB", False),
            ("p50_us", "p50", "us", False),
        )
        for size, c in proxy_cells:
            rows = measure_cell(
                f"proxy {size} B x{c}",
                proxy_variants,
                lambda v, size=size, c=c: runners.run_proxy(client, v, size, c, args.seconds),
                proxy_rows,
            )
            results["proxy"].append({"size": size, "conns": c, **rows})

    if "bulk" in args.parts:
        bulk_ratios = [
            (a, b)
            for a, b in (
                ("uringloop", "uringloop-copy"),
                ("uringloop-fixed", "uringloop-copy"),
                ("uringloop-fixed-copy", "uringloop-copy"),
                ("uringloop-copy", "uvloop"),
                ("uringloop-fixed", "uvloop"),
            )
            if a in variants and b in variants
        ]

        def bulk_rows(proto: str, size: int, run, which: list[str] = variants) -> None:
            per: dict[str, dict[str, list[float]]] = {}
            for _ in range(rounds):
                for v in which:
                    step(f"bulk {proto} {size} B {v}")
                    r = run(v)
                    per.setdefault("rate", {}).setdefault(v, []).append(r["gbytes_per_s"] * 1e3)
                    per.setdefault("cpu", {}).setdefault(v, []).append(r["cpu_s_per_gib"] * 1e3)
                    per.setdefault("kernel", {}).setdefault(v, []).append(
                        r["kernel_cpu_s_per_gib"] * 1e3
                    )
                    done()
            name = f"bulk {proto} {size} B " + ("files" if proto == "file" else "writes")
            results["bulk"].append(
                {
                    "proto": proto,
                    "size": size,
                    "mbytes_per_s": report.row(f"{name} MB/s", per["rate"], "MB/s"),
                    "cpu_ms_per_gib": report.row(f"{name} sender CPU", per["cpu"], "ms/GiB", False),
                    "kernel_cpu_ms_per_gib": report.row(
                        f"{name} sender kernel CPU", per["kernel"], "ms/GiB", False
                    ),
                }
            )

        tcp_sizes = ints(args.bulk_sizes)
        if tcp_sizes:
            report.header("bulk send, loopback TCP", variants, bulk_ratios)
        for size in tcp_sizes:
            bulk_rows(
                "tcp", size, lambda v, size=size: runners.run_bulk_tcp(v, size, args.bulk_mib << 20)
            )
        file_sizes = ints(args.file_sizes)
        if file_sizes:
            report.header(
                "loop.sendfile() of a cached file, loopback TCP (uvloop: read + write)",
                file_variants,
                [("uringloop", "asyncio"), ("uringloop", "uvloop")],
            )
        for size in file_sizes:
            bulk_rows(
                "file",
                size,
                lambda v, size=size: runners.run_bulk_tcp(
                    v, size, max(args.bulk_mib << 20, size), "file"
                ),
                file_variants,
            )
        if udp_sizes:
            report.header("bulk send, UDP into a dead-end veth", variants, bulk_ratios)
            with netns.dead_end_namespace() as ns:
                for size in udp_sizes:
                    bulk_rows(
                        "udp",
                        size,
                        lambda v, size=size: runners.run_bulk_udp(ns, v, size, args.udp_mib << 20),
                    )

    if "internals" in args.parts and internals:
        report.header("pyperformance (seconds per run)", loops, ratios(loops))
        for name, _, _ in internals:
            per_loop: dict[str, list[float]] = {}
            for lp in loops:
                step(f"internals {name} {lp}")
                try:
                    per_loop[lp] = [loop_internals.run(name, lp, args.quick)]
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    # (rloop 0.5 hangs in asyncio_tcp here: the cell says n/a, the run goes on)
                    why = "timed out" if isinstance(exc, subprocess.TimeoutExpired) else "failed"
                    results["notes"].append(f"internals: {name} on {lp} {why}")
                done()
            results["internals"][name] = report.row(name, per_loop, "s", False)

    failures = 0
    if "churn" in args.parts:
        failures = run_churn(args, results, report, bar)

    bar.close()
    out_dir = args.out or HERE / "results" / datetime.date.today().isoformat()
    json_path, md_path = write(results, report, out_dir, sys.argv[1:])
    print(f"results written to {json_path} and {md_path}")
    return 1 if failures else 0


CLIENT_NAMES = {
    "pg-select": "asyncpg SELECT 1",
    "pg-fetch": "asyncpg fetch 10,000 rows",
    "redis-get-set": "redis SET/GET",
    "redis-pipeline": "redis pipeline of 1,000 SETs",
}

# (where the client runs, kind of cycle)
CHURN_SERIES = (("uringloop", "echo"), ("uringloop", "abort"), ("C", "echo"), ("C", "abort"))


def run_churn(args: argparse.Namespace, results: dict, report: Report, bar) -> int:
    """The churn soak: its samples, table and FAIL lines; returns the number of FAILs."""
    cycles, size, conc = args.churn_cycles, args.churn_size, args.churn_conc
    every = churn.sample_every(cycles)
    client = runners.build("churn_client", ("-pthread",))
    report.table(
        f"connection churn, {cycles:,} cycles per series, {size} B echoes, {conc} at a time "
        "(server counters)",
        ["counter", "baseline", "final", "max", "allowed growth", ""],
    )
    failures = 0
    for where, kind in CHURN_SERIES:
        name = kind + (" from the C client" if where == "C" else " from a uringloop client")
        bar.set_description(f"churn {name}")
        t0 = time.monotonic()
        if where == "uringloop":
            runs = ((s, None) for s in runners.churn_inproc(kind, cycles, every, size, conc))
        else:
            runs = runners.churn_c_client(client, kind, cycles, every, size, conc)
        samples: list[dict] = []
        for samples, _ in runs:  # noqa: B007 (the last one is the whole run)
            bar.update(1)
        seconds = time.monotonic() - t0
        base_cycle, rows = churn.flatness(samples, cycles)
        ends = samples[-1]["ends"]
        results["churn"].append(
            {
                "client": where,
                "kind": kind,
                "cycles": cycles,
                "seconds": seconds,
                "baseline_cycle": base_cycle,
                "server_ends": ends,
                "flatness": rows,
                "samples": samples,
            }
        )
        label = f"{name} ({cycles / seconds:,.0f} cycles/s, baseline at cycle {base_cycle:,})"
        for row in rows:
            unit = f" {row['unit']}" if row["unit"] else ""
            verdict = "ok" if row["ok"] else "**FAIL**"
            report.cells(
                label,
                [
                    row["counter"],
                    f"{row['baseline']:,}{unit}",
                    f"{row['final']:,}{unit}",
                    f"{row['max']:,}{unit}",
                    f"{row['slack']:,}{unit}",
                    verdict,
                ],
            )
            label = ""
            if not row["ok"]:
                failures += 1
                line = (
                    f"FAIL churn {name}: {row['counter']} ended at {row['final']:,}{unit}, "
                    f"{row['final'] - row['baseline']:+,}{unit} from its baseline "
                    f"{row['baseline']:,}{unit} at cycle {base_cycle:,} "
                    f"(allowed: +{row['slack']:,}{unit})"
                )
                bar.write(line)
                results["notes"].append(line)
        bar.write(
            f"churn {name}: server ends {ends}; "
            + ("flat" if all(r["ok"] for r in rows) else "NOT flat")
        )
    return failures


if __name__ == "__main__":
    sys.exit(main())
