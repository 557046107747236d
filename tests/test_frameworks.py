"""The servers and tools people run asyncio with, unchanged, on uringloop.

aiohttp (server and client), uvicorn + Starlette (with --workers), hypercorn, gunicorn with
uvicorn workers, anyio, and the pytest plugin; each started as its users start it and
talked to with a real client.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import aiohttp
import anyio
import httpx
import pytest
import websockets.sync.client
from aiohttp import web
from conftest import EXAMPLES, ServerProcess, free_port, same

import uringloop

sys.path.insert(0, EXAMPLES)
import aiohttp_app  # noqa: E402
from test_examples import no_control_socket, spread_over_workers  # noqa: E402


def ring_fds(pid: int) -> int:
    """How many io_uring instances the process holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:
            pass
    return count


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def workers_of(server: ServerProcess, n: int) -> list[int]:
    """The n worker processes under the server's own process (which forked or spawned them)."""
    deadline = time.monotonic() + 20
    while True:
        # multiprocessing's resource tracker is a child too, but runs no loop
        pids = [p for p in children(server.proc.pid) if "resource_tracker" not in cmdline(p)]
        if len(pids) >= n or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def assert_one_ring_per_worker(server: ServerProcess, n: int) -> list[int]:
    """The parent never made a ring, so no worker can have inherited one; each has its own."""
    deadline = time.monotonic() + 20
    while True:  # a worker that has just started may not have made its loop yet
        pids = workers_of(server, n)
        rings = [ring_fds(p) for p in pids]
        if rings == [1] * n or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(pids) == n and rings == [1] * n, (pids, rings)
    assert ring_fds(server.proc.pid) == 0
    return pids


# ---------------------------------------------------------------- aiohttp


@pytest.fixture
def site(tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    return tmp_path


@pytest.mark.asyncio
async def test_aiohttp_app_runner_and_client_session(site):
    """AppRunner on the test's loop (asyncio, uvloop, uringloop), aiohttp's client on the same."""
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(aiohttp_app.make_app(site))
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]
    big = (site / "big.bin").read_bytes()
    spliced = loop.zerocopy_stats()["sendfile_spliced_bytes"] if uring(loop) else 0
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            async with session.get("/") as r:
                assert await r.text() == f"Hello from aiohttp on {type(loop).__name__}\n"
            # keep-alive requests at once over the session's connection pool
            texts = await asyncio.gather(*(fetch_text(session, "/stream?n=300") for _ in range(8)))
            assert all(t.splitlines() == [f"line {i}" for i in range(300)] for t in texts)
            async with session.get("/files/big.bin") as r:
                assert same(await r.read(), big)
            async with session.get("/files/big.bin", headers={"Range": "bytes=5-9"}) as r:
                assert r.status == 206 and await r.read() == big[5:10]
            async with session.ws_connect("/ws") as ws:
                for i in range(50):
                    await ws.send_str(f"message {i}")
                    assert await ws.receive_str() == f"message {i}"
                await ws.send_bytes(big[:500_000])
                assert same(await ws.receive_bytes(), big[:500_000])
    finally:
        await runner.cleanup()
    if uring(loop):  # FileResponse went through loop.sendfile's splice path, ranges too
        assert loop.zerocopy_stats()["sendfile_spliced_bytes"] - spliced == len(big) + 5


async def fetch_text(session: aiohttp.ClientSession, path: str) -> str:
    async with session.get(path) as r:
        return await r.text()


def uring(loop: asyncio.AbstractEventLoop) -> bool:
    return isinstance(loop, uringloop.UringEventLoop)


def test_aiohttp_in_asyncio_runner_with_loop_factory(site):
    """The pattern aiohttp's docs give for custom loops: AppRunner inside asyncio.Runner."""

    async def main() -> str:
        runner = web.AppRunner(aiohttp_app.make_app(site))
        await runner.setup()
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        await tcp.start()
        try:
            port = tcp._server.sockets[0].getsockname()[1]
            async with aiohttp.ClientSession() as session:
                return await fetch_text(session, f"http://127.0.0.1:{port}/")
        finally:
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uringloop.new_event_loop) as runner:
        assert runner.run(main()) == "Hello from aiohttp on UringEventLoop\n"


# ---------------------------------------------------------------- uvicorn + Starlette


def uvicorn(site, *options: str) -> ServerProcess:
    """`uvicorn starlette_app:app --loop uringloop:new_event_loop` serving files from site."""
    args = [sys.executable, "-m", "uvicorn", "starlette_app:app", "--app-dir", EXAMPLES]
    args += ["--port", str(free_port()), "--loop", "uringloop:new_event_loop", *options]
    return ServerProcess(
        args, ready=r"Uvicorn running on (http://\S+)", env={"EXAMPLE_ROOT": str(site)}
    )


def test_uvicorn_cli_with_loop_factory_and_two_workers(site):
    with uvicorn(site, "--workers", "2") as srv:
        base = srv.match.group(1)
        # uvicorn prints "running" before its workers have started their apps
        httpx_get_until_up(base)
        pids = assert_one_ring_per_worker(srv, 2)
        assert spread_over_workers(base, expected=2) == {str(p) for p in pids}
        starlette_routes(base, site)
    assert "Traceback" not in srv.output


def httpx_get_until_up(base: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(base + "/", timeout=5)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def starlette_routes(base: str, site) -> None:
    """Routes, StreamingResponse, FileResponse and a websocket of examples/starlette_app.py."""
    with httpx.Client(base_url=base, timeout=30) as client:
        assert "on UringEventLoop in" in client.get("/").text
        with client.stream("GET", "/stream", params={"n": "1000"}) as r:
            assert r.headers.get("transfer-encoding") == "chunked"
            assert "".join(r.iter_text()) == "".join(f"line {i}\n" for i in range(1000))
        r = client.get("/files/big.bin")
        assert r.headers["content-type"] == "application/octet-stream"
        assert same(r.content, (site / "big.bin").read_bytes())
        assert client.get("/files/missing").status_code == 404
    ws_url = base.replace("http://", "ws://") + "/ws"
    with websockets.sync.client.connect(ws_url, max_size=None) as ws:
        for i in range(20):
            ws.send(f"hello {i}")
            assert ws.recv() == f"hello {i}"
        blob = os.urandom(300_000)
        ws.send(blob)
        assert ws.recv() == blob


def test_uvicorn_single_process_serves_starlette(site):
    with uvicorn(site, "--ws", "websockets") as srv:
        starlette_routes(srv.match.group(1), site)
        assert ring_fds(srv.proc.pid) == 1
    assert srv.proc.returncode == 0 and "Traceback" not in srv.output


# ---------------------------------------------------------------- hypercorn


def test_hypercorn_asyncio_workers_with_the_policy_installed(site, tmp_path):
    """hypercorn's asyncio worker asks the policy for its loop; the app module installs it."""
    (tmp_path / "hyper_app.py").write_text(
        textwrap.dedent(
            """
            import uringloop

            uringloop.install()  # hypercorn's asyncio worker takes its loop from the policy

            from starlette_app import app
            """
        )
    )
    port = free_port()
    args = [sys.executable, "-m", "hypercorn", "hyper_app:app", "--worker-class", "asyncio"]
    args += ["--workers", "2", "--bind", f"127.0.0.1:{port}"]
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), EXAMPLES]), "EXAMPLE_ROOT": str(site)}
    with ServerProcess(args, ready=r"Running on (http://\S+)", env=env) as srv:
        base = srv.match.group(1)
        httpx_get_until_up(base)
        pids = assert_one_ring_per_worker(srv, 2)
        assert spread_over_workers(base, expected=2) == {str(p) for p in pids}
        starlette_routes(base, site)
    assert "Traceback" not in srv.output


def test_hypercorn_serve_in_uringloop_run(site):
    """hypercorn's programmatic API: serve() on a loop the caller chose."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    os.environ["EXAMPLE_ROOT"] = str(site)
    import starlette_app

    starlette_app.ROOT = site

    async def main() -> None:
        config = Config()
        config.bind = [f"127.0.0.1:{free_port()}"]
        config.accesslog = config.errorlog = None
        stop = asyncio.Event()
        server = asyncio.ensure_future(serve(starlette_app.app, config, shutdown_trigger=stop.wait))
        base = "http://" + config.bind[0]
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for _ in range(200):
                try:
                    r = await client.get("/")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            assert r.text.startswith("Hello from Starlette on UringEventLoop")
            r = await client.get("/files/big.bin")
            assert same(r.content, (site / "big.bin").read_bytes())
        stop.set()
        await server

    uringloop.run(main())


# ---------------------------------------------------------------- gunicorn


def test_gunicorn_uvicorn_workers_each_build_their_ring_after_fork(site):
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "starlette_app:app", "--chdir", EXAMPLES]
    args += ["-k", "uringloop.workers.UvicornWorker", "-w", "2", "-b", f"127.0.0.1:{port}"]
    # every worker is replaced after 40 requests: the socket they share must outlive each
    args += ["--max-requests", "40", *no_control_socket()]
    with ServerProcess(
        args, ready=r"Listening at: (http://\S+)", env={"EXAMPLE_ROOT": str(site)}
    ) as srv:
        base = srv.match.group(1)
        httpx_get_until_up(base)
        assert_one_ring_per_worker(srv, 2)
        starlette_routes(base, site)
        pids, retried = set(), 0
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(300):
                for _attempt in range(10):
                    try:
                        r = client.get("/", headers={"Connection": "close"})
                        break
                    except httpx.TransportError:
                        # a worker that reached its limit drops what it accepted meanwhile
                        # (so do uvloop's and asyncio's); the next try meets a live one
                        retried += 1
                        time.sleep(0.2)
                else:
                    raise AssertionError(f"no worker answers any more:\n{srv.output}")
                pids.add(r.text.rsplit(" ", 1)[1].strip())
        # uvicorn checks its request count every 100 ms, so a worker may serve more than
        # 40; but 300 requests outlast both first workers
        assert len(pids) >= 3, pids
        assert retried < 20
        assert_one_ring_per_worker(srv, 2)  # the replacements made their own rings too
    assert "Traceback" not in srv.output


# ---------------------------------------------------------------- anyio


def test_anyio_run_with_loop_factory(tmp_path):
    async def main() -> dict:
        import asyncio as aio

        results: dict = {"loop": type(aio.get_running_loop()).__name__}

        async def echo(stream) -> None:
            async with stream:
                async for chunk in stream:
                    await stream.send(chunk)

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            async with await anyio.connect_tcp("127.0.0.1", port) as client:
                payload = os.urandom(1_000_000)
                got = bytearray()
                async with anyio.create_task_group() as io:
                    io.start_soon(client.send, payload)
                    while len(got) < len(payload):
                        got += await client.receive()
                results["tcp"] = bytes(got) == payload
            tg.cancel_scope.cancel()
        with anyio.move_on_after(0.05) as scope:
            await anyio.sleep(10)
        results["timeout"] = scope.cancelled_caught
        results["thread"] = await anyio.to_thread.run_sync(lambda: "from a thread")
        done = await anyio.run_process([sys.executable, "-c", "print('child')"])
        results["process"] = done.stdout.decode().strip()
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
            addr = udp.extra(anyio.abc.SocketAttribute.local_address)
            await udp.sendto(b"datagram", *addr)
            results["udp"] = (await udp.receive())[0]
        path = tmp_path / "f.txt"
        async with await anyio.open_file(path, "w") as f:
            await f.write("via anyio")
        results["file"] = path.read_text()
        return results

    results = anyio.run(
        main, backend="asyncio", backend_options={"loop_factory": uringloop.new_event_loop}
    )
    assert results == {
        "loop": "UringEventLoop",
        "tcp": True,
        "timeout": True,
        "thread": "from a thread",
        "process": "child",
        "udp": b"datagram",
        "file": "via anyio",
    }


# ---------------------------------------------------------------- pytest plugin


def run_pytest(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-s", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )


PLUGIN_TESTS = """
import asyncio

import pytest
import pytest_asyncio


@pytest_asyncio.fixture
async def fixture_loop():
    return type(asyncio.get_running_loop()).__name__


@pytest.mark.asyncio
async def test_asyncio_marker(fixture_loop):
    loop = type(asyncio.get_running_loop()).__name__
    assert fixture_loop == loop
    print("ASYNCIO-TEST", loop)


@pytest.mark.anyio
async def test_anyio_marker():
    print("ANYIO-TEST", type(asyncio.get_running_loop()).__name__)
"""


def test_pytest_plugin_runs_a_projects_tests_on_the_named_loops(tmp_path):
    (tmp_path / "test_project.py").write_text(PLUGIN_TESTS)
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.pytest.ini_options]
            uringloop_loops = ["uringloop", "asyncio"]
            asyncio_default_fixture_loop_scope = "function"
            filterwarnings = ["error"]
            """
        )
    )
    both = run_pytest(tmp_path)
    assert both.returncode == 0, both.stdout + both.stderr
    lines = both.stdout.splitlines()
    for kind in ("ASYNCIO-TEST", "ANYIO-TEST"):
        assert sorted(line.split()[-1] for line in lines if kind in line) == [
            "UringEventLoop",
            "_UnixSelectorEventLoop",
        ], both.stdout
    assert "4 passed" in both.stdout

    # the command line narrows it for one run
    one = run_pytest(tmp_path, "--uringloop-loops=uringloop")
    assert one.returncode == 0 and "2 passed" in one.stdout, one.stdout + one.stderr
    assert "_UnixSelectorEventLoop" not in one.stdout

    bad = run_pytest(tmp_path, "--uringloop-loops=uringloop,tokio")
    assert bad.returncode != 0 and "unknown loop 'tokio'" in bad.stderr

    # the project's own choices win over the plugin's
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            import pytest

            def pytest_asyncio_loop_factories(config, item):
                return {"mine": asyncio.SelectorEventLoop}

            @pytest.fixture
            def anyio_backend():
                return "asyncio"
            """
        )
    )
    own = run_pytest(tmp_path)
    assert own.returncode == 0 and "UringEventLoop" not in own.stdout, own.stdout + own.stderr


def test_pytest_plugin_is_silent_until_configured(tmp_path):
    (tmp_path / "test_project.py").write_text(PLUGIN_TESTS)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    plain = run_pytest(tmp_path, "-k", "asyncio_marker")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "ASYNCIO-TEST _UnixSelectorEventLoop" in plain.stdout


# ---------------------------------------------------------------- no warnings


WARNINGS_CHECK = """
import asyncio, sys, uringloop

async def main():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    r, w = await asyncio.open_connection(*server_address)
    w.close()
    await w.wait_closed()

async def serve():
    global server_address
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    server_address = server.sockets[0].getsockname()
    async with server:
        await main()

if sys.version_info >= (3, 12):
    asyncio.run(serve(), loop_factory=uringloop.new_event_loop)
with asyncio.Runner(loop_factory=uringloop.new_event_loop) as runner:
    runner.run(serve())
uringloop.run(serve())
uringloop.install()  # code written for the policy
asyncio.run(serve())
loop = asyncio.new_event_loop()
loop.run_until_complete(serve())
loop.close()
print("clean")
"""


def test_nothing_warns_in_normal_use():
    """Every way in, under -W error and dev mode (ResourceWarning, slow callbacks, ...)."""
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", WARNINGS_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr
    assert done.stderr == ""
