"""A zero-copy static file server: `python examples/static_server.py [--root DIR] [--port 8080]`.

A small HTTP/1.1 server (GET and HEAD, keep-alive, single byte ranges, index.html for
directories) that sends every file body with `loop.sendfile()`. On uringloop that call
splices the file's page-cache pages into the socket inside the kernel: the bytes never
enter this process, so serving a file costs no read() and no copy in user space. The
headers go out with an ordinary write.

Try it: `curl -O localhost:8080/some/file`, `curl -r 0-99 localhost:8080/some/file`,
or `wrk -c 16 http://localhost:8080/some/file`.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import mimetypes
import os
import pathlib
import re
import urllib.parse
from http import HTTPStatus
from typing import BinaryIO

import uringloop

MAX_HEADER_BYTES = 16384
MAX_DISCARDED_BODY = 1 << 20
RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class BadRequest(Exception):
    pass


def parse_request(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest from None
    if not version.startswith("HTTP/1."):
        raise BadRequest
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest
        headers[name.strip().lower()] = value.strip()
    return method, target, version, headers


def resolve(root: pathlib.Path, target: str) -> pathlib.Path | None:
    """The file a request target names, or None when it is outside root or missing."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
    candidate = (root / path.lstrip("/")).resolve()
    if not candidate.is_relative_to(root):
        return None
    if candidate.is_dir():
        candidate = candidate / "index.html"
    return candidate if candidate.is_file() else None


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(offset, count) of a single `Range: bytes=a-b`; None for the whole file.

    Raises ValueError when the range cannot be satisfied.
    """
    match = RANGE.match(header or "")
    if match is None:
        return None  # absent, multiple ranges or another unit: send the whole file
    first, last = match.groups()
    if not first:  # bytes=-N: the last N bytes
        if not last or int(last) == 0:
            raise ValueError
        count = min(int(last), size)
        return size - count, count
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise ValueError
    return start, end - start + 1


async def send_file(writer: asyncio.StreamWriter, file: BinaryIO, offset: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.sendfile(writer.transport, file, offset, count)
    except NotImplementedError:  # a loop without sendfile (uvloop): read and write
        file.seek(offset)
        while count > 0:
            chunk = await loop.run_in_executor(None, file.read, min(count, 1 << 18))
            if not chunk:
                raise ConnectionError("the file shrank while it was being sent") from None
            writer.write(chunk)
            await writer.drain()
            count -= len(chunk)


class StaticServer:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root.resolve()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            await self.respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, keep=False)
        finally:
            writer.close()

    async def one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; returns whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return False  # the client closed between requests
        try:
            method, target, version, headers = parse_request(head[:-4])
        except BadRequest:
            await self.respond(writer, HTTPStatus.BAD_REQUEST, keep=False)
            return False
        connection = headers.get("connection", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if "transfer-encoding" in headers:  # no request bodies here, let alone chunked ones
            await self.respond(writer, HTTPStatus.NOT_IMPLEMENTED, keep=False)
            return False
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_DISCARDED_BODY:
            await self.respond(writer, HTTPStatus(413), keep=False)
            return False
        await reader.readexactly(int(length))  # a body nobody asked for: skip it
        if method not in ("GET", "HEAD"):
            await self.respond(writer, HTTPStatus.METHOD_NOT_ALLOWED, keep, {"Allow": "GET, HEAD"})
            return keep
        path = resolve(self.root, target)
        if path is None:
            await self.respond(writer, HTTPStatus.NOT_FOUND, keep)
            return keep
        try:
            file = open(path, "rb")
        except OSError:
            await self.respond(writer, HTTPStatus.FORBIDDEN, keep)
            return keep
        with file:
            size = os.fstat(file.fileno()).st_size
            try:
                part = byte_range(headers.get("range"), size)
            except ValueError:
                await self.respond(
                    writer, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, keep,
                    {"Content-Range": f"bytes */{size}"},
                )  # fmt: skip
                return keep
            offset, count = part if part is not None else (0, size)
            extra = {
                "Content-Type": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                "Last-Modified": email.utils.formatdate(
                    os.fstat(file.fileno()).st_mtime, usegmt=True
                ),
                "Accept-Ranges": "bytes",
            }
            status = HTTPStatus.OK
            if part is not None:
                status = HTTPStatus.PARTIAL_CONTENT
                extra["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
            await self.respond(writer, status, keep, extra, length=count)
            if method == "GET" and count:
                await send_file(writer, file, offset, count)
        return keep

    async def respond(
        self,
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        keep: bool,
        extra: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        body = b"" if length is not None else f"{status.value} {status.phrase}\n".encode()
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            "Server: uringloop-static",
            f"Content-Length: {len(body) if length is None else length}",
            f"Connection: {'keep-alive' if keep else 'close'}",
        ]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if length is None:
            lines.append("Content-Type: text/plain")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


async def main(root: pathlib.Path, host: str, port: int) -> None:
    handler = StaticServer(root)
    server = await asyncio.start_server(handler.handle, host, port, limit=MAX_HEADER_BYTES)
    bound = server.sockets[0].getsockname()
    loop = asyncio.get_running_loop()
    print(
        f"static file server on {type(loop).__name__} listening on "
        f"http://{bound[0]}:{bound[1]}, serving {handler.root}",
        flush=True,
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", type=pathlib.Path, default=pathlib.Path.cwd())
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    if not args.root.is_dir():
        ap.error(f"--root {args.root} is not a directory")
    try:
        uringloop.run(main(args.root, args.host, args.port))
    except KeyboardInterrupt:
        pass
