"""Each example starts with its one command, says where it listens, and serves a real client."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading

import aiohttp
import httpx
import pytest
from conftest import EXAMPLES, ServerProcess, free_port, same

import uringloop

CURL = ["curl", "--silent", "--show-error", "--fail", "--max-time", "30"]


def example(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(EXAMPLES, name), *args]


def server_io_chars(pid: int) -> int:
    """Bytes the process moved through read()-like calls (rchar of /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.fixture
def site(tmp_path):
    """A directory to serve: a 6 MiB file of random bytes, a small page, a subdirectory."""
    (tmp_path / "big.bin").write_bytes(os.urandom(6 << 20))
    (tmp_path / "hello.txt").write_text("hello, world\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.html").write_text("<h1>index</h1>\n")
    return tmp_path


def test_echo_server_serves_a_real_client():
    port = free_port()
    with ServerProcess(example("echo_server.py", "--port", str(port)), ready="listening on") as srv:
        assert "echo server on UringEventLoop" in srv.output and f":{port}" in srv.output
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            payload = os.urandom(300_000)
            sender = threading.Thread(target=c.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = c.recv(65536)
                assert chunk, "the server closed early"
                got += chunk
            sender.join()
            assert same(bytes(got), payload)
    assert srv.proc.returncode == 0 and "Traceback" not in srv.output


def test_static_server_sends_files_without_reading_them(site):
    port = free_port()
    args = example("static_server.py", "--root", str(site), "--port", str(port))
    with ServerProcess(args, ready=r"listening on (http://\S+),") as srv:
        base = srv.match.group(1)
        assert "static file server on UringEventLoop" in srv.output
        big = (site / "big.bin").read_bytes()
        before = server_io_chars(srv.proc.pid)
        for _ in range(3):
            got = subprocess.run([*CURL, f"{base}/big.bin"], capture_output=True, check=True)
            assert same(got.stdout, big)
        # 18 MiB went out; the server read() well under one copy of the file
        assert server_io_chars(srv.proc.pid) - before < len(big) // 8
        part = subprocess.run(
            [*CURL, "--range", "1000-1999", f"{base}/big.bin"], capture_output=True, check=True
        )
        assert part.stdout == big[1000:2000]
        tail = subprocess.run(
            [*CURL, "--range", "-10", f"{base}/big.bin"], capture_output=True, check=True
        )
        assert tail.stdout == big[-10:]
        with httpx.Client(base_url=base) as client:  # one keep-alive connection
            assert client.get("/hello.txt").text == "hello, world\n"
            r = client.get("/docs/")
            assert r.text == "<h1>index</h1>\n" and r.headers["content-type"] == "text/html"
            assert client.head("/big.bin").headers["content-length"] == str(len(big))
            assert client.get("/nothing").status_code == 404
            assert client.post("/hello.txt").status_code == 405
            assert client.get("/big.bin", headers={"Range": "bytes=99999999-"}).status_code == 416
            assert client.get("/%2e%2e/%2e%2e/etc/passwd").status_code == 404
            assert client.get("/hello.txt").text == "hello, world\n"
    assert srv.proc.returncode == 0 and "Traceback" not in srv.output


@pytest.mark.parametrize("mode", ["spliced", "copied"])
def test_tcp_proxy_forwards_both_ways_with_half_close(mode):
    echo_port, proxy_port = free_port(), free_port()
    echo = ServerProcess(example("echo_server.py", "--port", str(echo_port)), ready="listening on")
    proxy_args = example(
        "tcp_proxy.py",
        *(["--copy"] if mode == "copied" else []),
        "--listen",
        f"127.0.0.1:{proxy_port}",
        "--upstream",
        f"127.0.0.1:{echo_port}",
    )
    with echo, ServerProcess(proxy_args, ready="listening on") as proxy:
        assert "tcp proxy on UringEventLoop" in proxy.output
        assert f"forwarding to 127.0.0.1:{echo_port} ({mode}" in proxy.output
        payloads = [os.urandom(n) for n in (1, 70_000, 5_000_000)]

        def through(payload: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as c:

                def send():
                    c.sendall(payload)
                    c.shutdown(socket.SHUT_WR)  # the EOF must reach the echo server

                sender = threading.Thread(target=send)
                sender.start()
                got = bytearray()
                while chunk := c.recv(1 << 20):
                    got += chunk
                sender.join()
                return bytes(got)

        for payload in payloads:
            assert same(through(payload), payload)
        # several clients at once, each with its own upstream connection
        results: dict[int, bytes] = {}
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, through(payloads[1])))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 8 and all(same(r, payloads[1]) for r in results.values())
    # an upstream that is gone: the client's connection is closed, the proxy keeps running
    refused_port = free_port()
    proxy_args[-1] = f"127.0.0.1:{refused_port}"
    with ServerProcess(proxy_args, ready="listening on") as proxy:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as c:
                c.sendall(b"anyone?")
                try:
                    assert c.recv(100) == b""
                except ConnectionResetError:
                    pass  # abort() with our bytes unread: a reset instead of a FIN
    assert f"upstream 127.0.0.1:{refused_port}" in proxy.output
    assert proxy.proc.returncode == 0 and "Traceback" not in proxy.output


def test_aiohttp_app_with_aiohttp_client_and_curl(site):
    port = free_port()
    args = example("aiohttp_app.py", "--root", str(site), "--port", str(port))
    with ServerProcess(args, ready=r"listening on (http://\S+)") as srv:
        base = srv.match.group(1)
        assert "aiohttp on UringEventLoop" in srv.output
        big = (site / "big.bin").read_bytes()
        curl = subprocess.run([*CURL, f"{base}/files/big.bin"], capture_output=True, check=True)
        assert same(curl.stdout, big)

        async def client() -> None:
            async with aiohttp.ClientSession(base) as session:
                async with session.get("/") as r:
                    assert await r.text() == "Hello from aiohttp on UringEventLoop\n"
                async with session.get("/stream", params={"n": "2000"}) as r:
                    assert r.headers["Transfer-Encoding"] == "chunked"
                    lines = (await r.text()).splitlines()
                    assert lines == [f"line {i}" for i in range(2000)]
                async with session.get("/files/big.bin") as r:
                    assert same(await r.read(), big)
                async with session.get("/stats") as r:
                    stats = await r.json()
                # FileResponse took loop.sendfile's splice path, not its read+write fallback
                assert stats["sendfile_calls"] >= 2
                assert stats["sendfile_spliced_bytes"] >= 2 * len(big)
                async with session.ws_connect("/ws") as ws:
                    await ws.send_str("text over io_uring")
                    assert await ws.receive_str() == "text over io_uring"
                    blob = os.urandom(200_000)
                    await ws.send_bytes(blob)
                    assert await ws.receive_bytes() == blob

        uringloop.run(client())  # the client on uringloop too
    assert srv.proc.returncode == 0 and "Traceback" not in srv.output


def test_starlette_app_under_uvicorn_with_httpx(site):
    port = free_port()
    with ServerProcess(
        example("starlette_app.py", "--port", str(port)),
        ready=r"Uvicorn running on (http://\S+)",
        env={"EXAMPLE_ROOT": str(site)},
    ) as srv:
        base = srv.match.group(1)
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/").text.startswith("Hello from Starlette on UringEventLoop")
            assert client.get("/stream?n=5").text == "".join(f"line {i}\n" for i in range(5))
            assert same(client.get("/files/big.bin").content, (site / "big.bin").read_bytes())
    assert "Traceback" not in srv.output


def test_gunicorn_config_runs_two_workers_on_uringloop():
    port = free_port()
    with ServerProcess(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            os.path.join(EXAMPLES, "gunicorn.conf.py"),
            "-b",
            f"127.0.0.1:{port}",
        ]
        + no_control_socket(),
        ready=r"Listening at: (http://\S+)",
        cwd="/",
    ) as srv:
        base = srv.match.group(1)
        pids = spread_over_workers(base, expected=2)
        assert len(pids) == 2
    assert "Traceback" not in srv.output


def no_control_socket() -> list[str]:
    """gunicorn 24+ opens a control socket in ~/.gunicorn; tests run several at once."""
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True
    ).stdout
    return ["--no-control-socket"] if "--no-control-socket" in out else []


def spread_over_workers(base: str, expected: int, requests: int = 400) -> set[str]:
    """Many concurrent clients, a new connection per request; the pids that answered."""

    async def fetch(client: httpx.AsyncClient, seen: set[str]) -> None:
        r = await client.get("/", headers={"Connection": "close"})
        assert r.status_code == 200 and "on UringEventLoop in " in r.text
        seen.add(r.text.rsplit(" ", 1)[1].strip())

    async def run() -> set[str]:
        seen: set[str] = set()
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            for _ in range(requests // 50):
                await asyncio.gather(*(fetch(client, seen) for _ in range(50)))
                if len(seen) >= expected:
                    break
        return seen

    return uringloop.run(run())  # httpx (over anyio) on uringloop too
