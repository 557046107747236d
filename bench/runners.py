"""How each benchmark is run: one subprocess per server or sender, pinned to a CPU.

Every function here starts what it measures in its own process (a fresh loop, no state
carried between cells) and returns the numbers of one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from . import netns

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


class Unsupported(RuntimeError):
    """The server cannot run on this loop (it said so instead of READY)."""


@contextlib.contextmanager
def server_on_cpu0(
    argv: list[str], what: str, cpu: int = 0, ready: str = r"READY (\d+)"
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start a server whose first line says its port (`ready`), pinned to a CPU (0 unless
    told); yield it and its port."""
    server = subprocess.Popen(pinned(cpu, argv), stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    try:
        line = server.stdout.readline()
        if line.startswith("UNSUPPORTED"):
            raise Unsupported(f"{what}: {line[len('UNSUPPORTED') :].strip()}")
        match = re.search(ready, line)
        if match is None:
            raise RuntimeError(f"{what} did not start: {line!r}")
        yield server, match.group(1)
    finally:
        server.terminate()
        server.wait(10)
        server.stdout.close()


def run_echo(client: Path, loop: str, mode: str, size: int, conns: int, seconds: float) -> dict:
    with server_on_cpu0(echo_server_argv(loop, mode), f"{loop} {mode} server") as (server, port):
        argv = pinned(1, [str(client), "127.0.0.1", port, str(conns), str(size)])
        # warm-up, then the timed run
        subprocess.run([*argv, str(min(0.5, seconds / 4))], capture_output=True, check=True)
        cpu0 = cpu_seconds(server.pid)
        out = subprocess.run([*argv, str(seconds)], capture_output=True, text=True, check=True)
        cpu1 = cpu_seconds(server.pid)
    result = json.loads(out.stdout)
    result["server_cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(result["requests"], 1)
    return result


# The proxy benchmark: uringloop forwarding inside the kernel (loop.forward()) and
# copying proxies (examples/tcp_proxy.py --copy) on three loops.
PROXY_VARIANTS = ("uringloop-splice", "uringloop-copy", "uvloop-copy", "asyncio-copy")


def run_proxy(client: Path, variant: str, size: int, conns: int, seconds: float) -> dict:
    """The echo load generator through a proxy (CPU 0) to the C echo server: each request
    crosses the proxy twice (2 x size bytes). Throughput and the proxy's CPU per GiB
    (its io-wq workers included: they are threads of its process)."""
    loop, mode = variant.rsplit("-", 1)
    upstream_argv = echo_server_argv(REFERENCE, "protocol")
    with server_on_cpu0(upstream_argv, "C echo upstream", cpu=1) as (upstream, upstream_port):
        proxy_argv = [
            sys.executable,
            str(HERE.parent / "examples" / "tcp_proxy.py"),
            f"--loop={loop}",
            *(["--copy"] if mode == "copy" else []),
            "--listen=127.0.0.1:0",
            f"--upstream=127.0.0.1:{upstream_port}",
        ]
        with server_on_cpu0(proxy_argv, f"{variant} proxy", ready=r"listening on \S+:(\d+)") as (
            proxy,
            port,
        ):
            argv = pinned(1, [str(client), "127.0.0.1", port, str(conns), str(size)])
            subprocess.run([*argv, str(min(0.5, seconds / 4))], capture_output=True, check=True)
            cpu0, peers0 = cpu_seconds(proxy.pid), cpu_seconds(upstream.pid) + children_cpu()
            out = subprocess.run([*argv, str(seconds)], capture_output=True, text=True, check=True)
            cpu1, peers1 = cpu_seconds(proxy.pid), cpu_seconds(upstream.pid) + children_cpu()
    result = json.loads(out.stdout)
    gib = max(result["requests"], 1) * 2 * size / (1 << 30)
    result["mib_per_s"] = result["rps"] * 2 * size / (1 << 20)
    result["proxy_cpu_ms_per_gib"] = (cpu1 - cpu0) * 1e3 / gib
    # the C client's and the C echo server's CPU (CPU 1): what the proxy's way of
    # sending costs its peers
    result["peers_cpu_ms_per_gib"] = (peers1 - peers0) * 1e3 / gib
    return result


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the load generator runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def udp_rcvbuf(size: int, clients: int) -> int:
    """SO_RCVBUF for the UDP echo servers: room for every client's datagram at once.

    In a closed loop each client has at most one datagram in flight; a default-sized
    buffer (about 200 KiB) would drop some of 128 x 16 KiB and turn the run into a
    measure of the load generator's loss timeout. Same size for every server.
    """
    truesize = 1 << (size + 1024).bit_length()  # what the kernel charges, rounded up
    return max(1 << 20, clients * truesize)


def udp_echo_server_argv(loop: str, size: int, clients: int) -> list[str]:
    rcvbuf = udp_rcvbuf(size, clients)
    if loop == REFERENCE:
        return [str(build("ring_udp_echo_server", ("-luring",))), "0", str(rcvbuf)]
    return [
        sys.executable,
        "-m",
        "bench.udp_echo_server",
        f"--loop={loop}",
        f"--rcvbuf={rcvbuf}",
    ]


def run_udp_echo(client: Path, loop: str, size: int, clients: int, seconds: float) -> dict:
    """The UDP load generator (CPU 1) against a UDP echo server on `loop` (CPU 0)."""

    def load(argv: list[str], secs: float) -> dict:
        out = subprocess.run([*argv, str(secs)], capture_output=True, text=True, timeout=secs + 30)
        if out.returncode:
            raise RuntimeError(f"UDP load generator failed: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout)

    argv = udp_echo_server_argv(loop, size, clients)
    with server_on_cpu0(argv, f"{loop} UDP echo server") as (server, port):
        argv = pinned(1, [str(client), "127.0.0.1", port, str(clients), str(size)])
        load(argv, min(0.5, seconds / 4))  # warm-up, then the timed run
        cpu0 = cpu_seconds(server.pid)
        result = load(argv, seconds)
        cpu1 = cpu_seconds(server.pid)
    if not result["datagrams"]:
        raise RuntimeError(f"no echo came back ({result['losses']} datagrams lost)")
    result["server_cpu_us_per_dgram"] = (cpu1 - cpu0) * 1e6 / result["datagrams"]
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


def run_bulk_tcp(variant: str, size: int, total: int, proto: str = "tcp") -> dict:
    sink = subprocess.Popen(
        pinned(1, [sys.executable, "-m", "bench.bulk", "--sink"]),
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    try:
        port = sink.stdout.readline().split()[1]
        out = subprocess.run(
            pinned(0, bulk_argv(variant, proto, size, total, [f"--port={port}"])),
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


def _wrk_time_us(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def parse_wrk(output: str) -> dict:
    """Requests/s and latency percentiles from `wrk --latency` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    latency = {
        int(p): _wrk_time_us(v)
        for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.MULTILINE)
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)$", output, re.MULTILINE)
    if errors or socket_errors:
        raise RuntimeError(f"wrk saw errors: {output[-500:]}")
    if 50 not in latency or 99 not in latency:  # no request finished in the run
        raise RuntimeError(f"wrk reported no latency distribution: {output[-500:]}")
    return {"rps": rps, "p50_us": latency[50], "p99_us": latency[99]}


def run_http(loop: str, server_name: str, path: str, conns: int, seconds: float) -> dict:
    """wrk against one HTTP server (bench.http_server) on `loop`, server on CPU 0."""
    argv = [sys.executable, "-m", "bench.http_server", f"--loop={loop}", f"--server={server_name}"]
    with server_on_cpu0(argv, f"{server_name} on {loop}") as (server, port):
        url = f"http://127.0.0.1:{port}{path}"
        wrk = ["wrk", "-t1", f"-c{conns}", "--latency"]
        subprocess.run(pinned(1, [*wrk, "-d1s", url]), capture_output=True, check=True)
        cpu0 = cpu_seconds(server.pid)
        duration = max(1, round(seconds))
        out = subprocess.run(
            pinned(1, [*wrk, f"-d{duration}s", url]), capture_output=True, text=True, check=True
        )
        cpu1 = cpu_seconds(server.pid)
    result = parse_wrk(out.stdout)
    result["server_cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(result["rps"] * duration, 1)
    return result


def churn_inproc(kind: str, cycles: int, every: int, size: int, conc: int):
    """Churn with both ends on uringloop in one process (CPU 0).

    Yields the samples so far after each one the process prints (every `every` cycles).
    """
    argv = [sys.executable, "-m", "bench.churn", "inproc", f"--kind={kind}"]
    argv += [f"--cycles={cycles}", f"--every={every}", f"--size={size}", f"--conc={conc}"]
    err = tempfile.TemporaryFile("w+")  # (a pipe left unread could fill and stall it)
    proc = subprocess.Popen(
        pinned(0, argv), stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE.parent
    )
    samples: list[dict] = []
    try:
        for line in proc.stdout:
            samples.append(json.loads(line))
            yield samples
        if proc.wait() or not samples or samples[-1]["cycle"] != cycles:
            err.seek(0)
            raise RuntimeError(f"churn {kind} in one process failed: {err.read().strip()[-1500:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        err.close()


def churn_sample(port: str, expected: int) -> dict:
    """The churn server's counters, once it has seen `expected` connections end."""
    import socket

    with socket.create_connection(("127.0.0.1", int(port)), timeout=60) as s:
        s.sendall(f"?{expected}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            more = s.recv(65536)
            if not more:
                raise RuntimeError(f"the churn server closed the control connection: {reply!r}")
            reply += more
    return json.loads(reply)


def churn_c_client(client: Path, kind: str, cycles: int, every: int, size: int, conc: int):
    """Churn from the C client (CPU 1) against a uringloop churn server (CPU 0).

    The client runs in chunks of `every` cycles; after each the server is asked for its
    counters. Yields (samples so far, the client's last result) after every chunk.
    """
    argv = [sys.executable, "-m", "bench.churn", "serve", "--loop=uringloop"]
    with server_on_cpu0(argv, "uringloop churn server") as (server, port):
        done = 0
        samples = [{"cycle": 0, **churn_sample(port, 0)}]
        yield samples, None
        while done < cycles:
            chunk = min(every, cycles - done)
            cmd = [str(client), "127.0.0.1", port, kind, str(chunk), str(size), str(conc)]
            out = subprocess.run(
                pinned(1, [*cmd, str(done)]), capture_output=True, text=True, timeout=600
            )
            if out.returncode:
                raise RuntimeError(f"churn client failed: {out.stderr.strip()[-500:]}")
            done += chunk
            samples.append({"cycle": done, **churn_sample(port, done)})
            yield samples, json.loads(out.stdout)


def run_db_client(loop: str, work: str, conns: int, seconds: float, port: int) -> dict:
    """One client run (bench/db_client.py) on `loop`, pinned to CPU 0; its JSON result."""
    argv = [sys.executable, "-m", "bench.db_client", f"--loop={loop}", f"--work={work}"]
    argv += [f"--conns={conns}", f"--seconds={seconds}", f"--port={port}"]
    out = subprocess.run(
        pinned(0, argv), capture_output=True, text=True, cwd=HERE.parent, timeout=seconds * 3 + 60
    )
    if out.returncode:
        raise RuntimeError(f"{work} x{conns} on {loop} failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_server_available(name: str = "ring_echo_server") -> bool:
    try:
        build(name, ("-luring",))
        return True
    except (OSError, subprocess.CalledProcessError):
        return False
