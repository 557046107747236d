"""PostgreSQL and Redis servers for the client benchmarks, started for the run and stopped after.

Both run on CPU 1 (the client under test runs on CPU 0), from Debian's packages
(postgresql-15, redis-server), with everything that would make the server itself the
subject turned off: no fsync or synchronous commit, no persistence. They listen on a free
port of 127.0.0.1 and keep their files in a temporary directory. PostgreSQL refuses to run
as root, so a root run starts it as `nobody`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = "/usr/bin/redis-server"
SERVER_CPU = 1


def unavailable_reason() -> str | None:
    """Why the client benchmarks cannot run here (None when they can)."""
    missing = [
        str(PG_BIN / b) for b in ("initdb", "pg_ctl", "postgres") if not (PG_BIN / b).exists()
    ]
    if not Path(REDIS_SERVER).exists():
        missing.append(REDIS_SERVER)
    if missing:
        return "missing " + ", ".join(missing) + " (apt-get install postgresql-15 redis-server)"
    for module in ("asyncpg", "redis"):
        try:
            __import__(module)
        except ImportError:
            return f"the Python package {module} is not installed (pip install -e '.[test,bench]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_server_cpu(argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(SERVER_CPU), *argv]
    return argv


@contextlib.contextmanager
def postgres() -> Iterator[dict]:
    """A throwaway cluster; yields asyncpg.connect() keyword arguments for TCP."""
    run_as: list[str] = []
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        nobody = pwd.getpwnam("nobody")
        run_as, uid, gid = ["runuser", "-u", "nobody", "--"], nobody.pw_uid, nobody.pw_gid
    root = Path(tempfile.mkdtemp(prefix="uringloop-bench-pg-"))
    os.chown(root, uid, gid)
    data, log, port = root / "data", root / "server.log", _free_port()

    def tool(name: str, *args: str) -> None:
        proc = subprocess.run(
            _on_server_cpu([*run_as, str(PG_BIN / name), *args]),
            cwd=root,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{name} failed: {proc.stdout}{proc.stderr}{tail}")

    started = False
    try:
        tool("initdb", "-D", str(data), "-U", "bench", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=64"
        )
        tool("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
        started = True
        yield dict(host="127.0.0.1", port=port, user="bench", database="postgres", ssl=False)
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                tool("pg_ctl", "-D", str(data), "-w", "-t", "60", "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def redis() -> Iterator[dict]:
    """redis-server without persistence; yields redis.asyncio.Redis() keyword arguments."""
    root = Path(tempfile.mkdtemp(prefix="uringloop-bench-redis-"))
    port = _free_port()
    argv = [
        REDIS_SERVER,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(root),
        "--logfile",
        str(root / "redis.log"),
    ]
    server = subprocess.Popen(_on_server_cpu(argv), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit status {server.poll()})")
            time.sleep(0.05)
        yield dict(host="127.0.0.1", port=port)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)
