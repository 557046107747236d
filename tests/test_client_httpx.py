"""httpx.AsyncClient (httpcore over anyio's asyncio backend) on uringloop, against servers on
uringloop too, compared with the same on asyncio's loop and on uvloop.

Each scenario starts a server in a thread of its own, on a fresh loop of the kind under
test: one written with aiohttp.web and one written with plain asyncio streams (a small
HTTP/1.1 server that reads chunked request bodies and sends chunked responses). The
client runs on a second fresh loop of the same kind and makes, over one keep-alive
connection: 100 requests, a 32 MiB request body from an async generator (hashed by the
server as it arrives) and a 32 MiB response read with aiter_bytes (hashed by the client);
then a response dropped unread half-way and a request that times out, each of which must
close its connection on both sides. Both loops of a uringloop run must leave nothing in
their rings after close(). The bodies are the issue's full 32 MiB.

test_examples.py and test_frameworks.py already drive httpx against uvicorn, hypercorn and
gunicorn (many requests, new connections); this module covers what they do not: one
connection reused throughout, and bodies streamed both ways without being buffered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import ssl
import sys
import threading
import traceback

import httpx
import pytest
from aiohttp import web
from conftest import CERTS

import uringloop

try:
    import uvloop
except ImportError:  # uvloop has no wheel for this interpreter
    uvloop = None

LOOPS = {"asyncio": asyncio.SelectorEventLoop, "uringloop": uringloop.new_event_loop}
if uvloop is not None:
    LOOPS["uvloop"] = uvloop.new_event_loop

BODY = random.Random(17).randbytes(32 << 20)
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()
SERVER_CHUNK = 256 << 10
# what the client's generator yields, in turn: odd sizes, tiny and large
UPLOAD_PIECES = [1, 100, 65536, 300_000, 8191, 1 << 20, 3]
KEEPALIVE_REQUESTS = 100


class Shared:
    """What the server and the client (two threads, two loops) tell each other."""

    def __init__(self) -> None:
        self.peer_ports: list[int] = []  # one per connection the server accepted
        self.upload_generator_done = False
        self.generator_done_at_first_piece: bool | None = None
        self.download_sent = False
        self.download_error: BaseException | None = None  # a download the client dropped
        self.stall_saw_close = False  # /stall noticed that the client went away


def hashed(sha, length: int, pieces: int) -> dict:
    return {"sha256": sha.hexdigest(), "length": length, "pieces": pieces > 1}


# --- the servers ------------------------------------------------------------------------


async def aiohttp_server(shared: Shared, stop: asyncio.Event, ready) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"{peer_port(request.transport)} {request.query['i']}")

    async def upload(request: web.Request) -> web.Response:
        sha, length, pieces = hashlib.sha256(), 0, 0
        async for data in request.content.iter_any():
            if not pieces:
                shared.generator_done_at_first_piece = shared.upload_generator_done
            sha.update(data)
            length += len(data)
            pieces += 1
        return web.json_response(hashed(sha, length, pieces))

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(BODY)
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        try:
            for offset in range(0, len(BODY), SERVER_CHUNK):
                await response.write(BODY[offset : offset + SERVER_CHUNK])
        except Exception as exc:
            shared.download_error = exc
            raise
        shared.download_sent = True
        await response.write_eof()
        return response

    async def stall(request: web.Request) -> web.Response:
        # no answer until the client gives up and closes (aiohttp does not cancel the
        # handler then: it only sees the transport closing)
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.01)
        shared.stall_saw_close = True
        return web.Response(text="too late")

    async def on_connection(request: web.Request, response: web.StreamResponse) -> None:
        port = peer_port(request.transport)
        if port not in shared.peer_ports:
            shared.peer_ports.append(port)

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/stall", stall)
    app.on_response_prepare.append(on_connection)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        await stop.wait()
    finally:
        await runner.cleanup()


def peer_port(transport) -> int:
    return transport.get_extra_info("peername")[1]


async def streams_server(shared: Shared, stop: asyncio.Event, ready, tls=None) -> None:
    """HTTP/1.1 on asyncio.start_server: keep-alive, chunked and sized bodies; HTTPS with
    an SSLContext (the loop's TLS; httpx's side is anyio's TLS over the loop's TCP)."""
    handlers: set[asyncio.Task] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        shared.peer_ports.append(peer_port(writer.transport))
        try:
            while await one_request(reader, writer, shared):
                pass
        except ConnectionError:
            pass  # the client reset the connection between or inside requests
        finally:
            handlers.discard(asyncio.current_task())
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    try:
        port = server.sockets[0].getsockname()[1]
        # tests/certs/keycert.pem is for localhost
        ready(f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}")
        await stop.wait()
    finally:
        server.close()
        # the client closed its connection: each handler ends at that end of stream (a
        # cancelled one would be logged by 3.11's start_server as an error)
        if handlers:
            await asyncio.wait(handlers, timeout=10)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shared: Shared
) -> bool:
    """Serves one request; False when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return False
    request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    method, target, version = request_line.split(" ")
    assert version == "HTTP/1.1", request_line
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")

    sha, length, pieces = hashlib.sha256(), 0, 0
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers
                break
            data = await reader.readexactly(size)
            if not pieces:
                shared.generator_done_at_first_piece = shared.upload_generator_done
            sha.update(data)
            length += size
            pieces += 1
            assert await reader.readexactly(2) == b"\r\n"
    else:
        data = await reader.readexactly(int(headers.get("content-length", "0")))
        sha.update(data)
        length, pieces = len(data), 1

    if method == "GET" and path == "/hello":
        body = f"{peer_port(writer.transport)} {query.removeprefix('i=')}".encode()
        respond(writer, b"text/plain", body)
    elif method == "POST" and path == "/upload":
        respond(writer, b"application/json", json.dumps(hashed(sha, length, pieces)).encode())
    elif method == "GET" and path == "/download":
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        try:
            for offset in range(0, len(BODY), SERVER_CHUNK):
                chunk = BODY[offset : offset + SERVER_CHUNK]
                writer.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
                await writer.drain()
        except Exception as exc:
            shared.download_error = exc
            return False
        shared.download_sent = True
        writer.write(b"0\r\n\r\n")
    elif method == "GET" and path == "/stall":
        # no answer: the client times out and closes (or resets), the end of the stream
        try:
            assert await reader.read() == b""
        finally:
            shared.stall_saw_close = True
        return False
    else:
        respond(writer, b"text/plain", b"not found", status=b"404 Not Found")
    await writer.drain()
    return headers.get("connection", "").lower() != "close"


def respond(writer, content_type: bytes, body: bytes, status: bytes = b"200 OK") -> None:
    writer.write(
        b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
        % (status, content_type, len(body), body)
    )


SERVER_TLS = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
SERVER_TLS.load_cert_chain(os.path.join(CERTS, "keycert.pem"))
CLIENT_TLS = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
CLIENT_TLS.load_verify_locations(os.path.join(CERTS, "ca.pem"))


async def tls_streams_server(shared: Shared, stop: asyncio.Event, ready) -> None:
    await streams_server(shared, stop, ready, tls=SERVER_TLS)


SERVERS = {
    "aiohttp.web": aiohttp_server,
    "asyncio streams": streams_server,
    "asyncio streams TLS": tls_streams_server,
}


class ServerThread:
    """server(shared, stop, ready) on a fresh loop from factory, in a thread of its own."""

    def __init__(self, factory, server) -> None:
        self.factory, self.server = factory, server
        self.shared = Shared()
        self.base: str | None = None
        self.error: BaseException | None = None
        self.loop = None
        self.ready = threading.Event()

    def run(self) -> None:
        self.loop = loop = self.factory()
        try:
            self.stop = asyncio.Event()
            loop.run_until_complete(self.server(self.shared, self.stop, self.listening))
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def listening(self, base: str) -> None:
        self.base = base
        self.ready.set()

    def __enter__(self) -> ServerThread:
        self.thread = threading.Thread(target=self.run, name="server")
        self.thread.start()
        self.ready.wait(30)
        if self.base is None:
            self.thread.join(10)
            raise AssertionError(f"the server did not start: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server's loop did not stop"


def ring_left(loop) -> str | None:
    if isinstance(loop, uringloop.UringEventLoop):
        stats, zc = loop._ring.stats(), loop._ring.zerocopy_stats()
        if stats["inflight"] or stats["records"] or zc["pinned_buffers"]:
            return f"{stats}\n{zc}"
    return None


def on_each_loop(server, scenario, *, timeout: float = 60.0) -> dict:
    """scenario(base URL, Shared) on a fresh loop of each kind, against server on another
    fresh loop of the same kind: {loop name: result}, each equal to asyncio's loop's."""
    results, failures = {}, {}
    for name, factory in LOOPS.items():
        srv = ServerThread(factory, server)
        loop = factory()
        try:
            with srv:
                results[name] = loop.run_until_complete(
                    asyncio.wait_for(scenario(srv.base, srv.shared), timeout)
                )
        except Exception as exc:
            failures[name] = "".join(traceback.format_exception(exc))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
        if srv.error is not None:
            failures[f"{name} server"] = "".join(traceback.format_exception(srv.error))
        for side, each in (("client", loop), ("server", srv.loop)):
            if (left := ring_left(each)) is not None:
                failures[f"{name} {side} ring after close"] = left
    if failures:
        raise AssertionError("\n".join(f"--- {name}:\n{text}" for name, text in failures.items()))
    for name, result in results.items():
        assert result == results["asyncio"], f"{name} differs from asyncio's loop"
    return results


# --- the client -------------------------------------------------------------------------


async def upload_body(shared: Shared):
    """BODY in pieces of odd sizes, as an async generator (so httpx sends it chunked)."""
    offset, i = 0, 0
    while offset < len(BODY):
        size = UPLOAD_PIECES[i % len(UPLOAD_PIECES)]
        yield BODY[offset : offset + size]
        offset += size
        i += 1
        if i % 16 == 0:
            await asyncio.sleep(0)
    shared.upload_generator_done = True


async def one_connection(base: str, shared: Shared) -> dict:
    out: dict = {}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=base, limits=limits, timeout=30, verify=CLIENT_TLS
    ) as client:
        ports = set()
        for i in range(KEEPALIVE_REQUESTS):
            r = await client.get("/hello", params={"i": i})
            assert r.status_code == 200 and r.http_version == "HTTP/1.1", r
            port, echoed = r.text.split()
            assert echoed == str(i)
            ports.add(int(port))
        out["keep-alive ports"] = len(ports)

        r = await client.post("/upload", content=upload_body(shared))
        assert r.status_code == 200, r.text
        out["upload"] = r.json()
        assert out["upload"] == {"sha256": BODY_SHA256, "length": len(BODY), "pieces": True}
        # the server hashed the first piece before the generator had made the last
        out["generator done at server's first piece"] = shared.generator_done_at_first_piece

        async with client.stream("GET", "/download") as r:
            assert r.status_code == 200
            sha, length, pieces, sent_at_first = hashlib.sha256(), 0, 0, None
            async for data in r.aiter_bytes():
                if sent_at_first is None:
                    sent_at_first = shared.download_sent
                sha.update(data)
                length += len(data)
                pieces += 1
        out["download"] = hashed(sha, length, pieces)
        assert out["download"] == {"sha256": BODY_SHA256, "length": len(BODY), "pieces": True}
        # the first bytes came before the server had written the last: nothing buffered it
        out["server done at client's first piece"] = sent_at_first

        r = await client.get("/hello", params={"i": "last"})
        ports.add(int(r.text.split()[0]))
        out["ports after bodies"] = len(ports)
    out["connections accepted"] = len(shared.peer_ports)
    return out


EXPECTED = {
    "keep-alive ports": 1,
    "upload": {"sha256": BODY_SHA256, "length": len(BODY), "pieces": True},
    "generator done at server's first piece": False,
    "download": {"sha256": BODY_SHA256, "length": len(BODY), "pieces": True},
    "server done at client's first piece": False,
    "ports after bodies": 1,
    "connections accepted": 1,
}


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def dropped_and_timed_out(base: str, shared: Shared) -> dict:
    """A response body left unread, then a request that times out: each closes its
    connection; the server notices both, and the client goes on with a new one."""
    out: dict = {}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=base, limits=limits, timeout=30, verify=CLIENT_TLS
    ) as client:

        async def port() -> int:
            r = await client.get("/hello", params={"i": 0})
            return int(r.text.split()[0])

        first = await port()
        async with client.stream("GET", "/download") as r:
            got = 0
            async for data in r.aiter_bytes():
                got += len(data)
                if got >= 1 << 20:
                    break  # leaving the block closes the connection with bytes unread
        await until(lambda: shared.download_error is not None, "the server's write to fail")
        # asyncio's loop says ConnectionResetError or BrokenPipeError, by timing
        out["download error"] = isinstance(shared.download_error, ConnectionError)
        second = await port()
        out["new connection after drop"] = second != first

        started = asyncio.get_running_loop().time()
        try:
            await client.get("/stall", timeout=httpx.Timeout(30, read=0.3))
        except httpx.ReadTimeout:
            out["stall"] = "ReadTimeout"
        # a hang check, not a speed check
        out["timeout prompt"] = asyncio.get_running_loop().time() - started < 10
        await until(lambda: shared.stall_saw_close, "the server to see the client go")
        third = await port()
        out["new connection after timeout"] = third not in (first, second)
    out["connections accepted"] = len(shared.peer_ports)
    return out


@pytest.mark.parametrize("server", SERVERS.values(), ids=SERVERS)
def test_httpx_one_keepalive_connection_streaming_both_ways(server):
    results = on_each_loop(server, one_connection)
    assert results["asyncio"] == EXPECTED


# Not over TLS: there, on 3.11, asyncio's own loop never fails the server's drain() after
# the client reset the connection (its SSL layer drops the writes, the handler "sends" the
# whole body), so it has no answer to compare with. On 3.13 the same holds for its plain
# streams server (seen on CI: the server's write never failed; uringloop's and uvloop's did).
DROP_SERVERS = [aiohttp_server, streams_server] if sys.version_info < (3, 13) else [aiohttp_server]


@pytest.mark.parametrize("server", DROP_SERVERS, ids=list(SERVERS)[: len(DROP_SERVERS)])
def test_httpx_dropped_stream_and_read_timeout_close_the_connection(server):
    results = on_each_loop(server, dropped_and_timed_out)
    assert results["asyncio"] == {
        "download error": True,
        "new connection after drop": True,
        "stall": "ReadTimeout",
        "timeout prompt": True,
        "new connection after timeout": True,
        "connections accepted": 3,
    }
