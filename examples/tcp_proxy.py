"""A TCP proxy on uringloop.

    python examples/tcp_proxy.py --upstream HOST:PORT [--listen HOST:PORT] [--copy]

Every connection to the listening address gets its own connection to the upstream, and
bytes flow both ways as they arrive. By default they never enter the process:
`loop.forward()` splices each direction socket -> pipe -> socket inside the kernel,
and the pipe is the only buffer, so a slow reader stops reads from the other side.
With --copy every byte goes through data_received() and write() instead, with flow
control end to end: when one side's transport buffers more than its high-water mark,
reading from the other side pauses until it drains (this mode runs on any asyncio
loop: --loop asyncio|uvloop, for comparisons). Either way a half-close (EOF) travels
through, so request/response protocols that shut down their sending side still get
their answer.

Try it in front of the echo example:
    python examples/echo_server.py --port 8888 &
    python examples/tcp_proxy.py --listen 127.0.0.1:9000 --upstream 127.0.0.1:8888
    nc 127.0.0.1 9000
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

import uringloop


async def connect_upstream(
    client: asyncio.Transport, upstream: tuple[str, int], factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Protocol] | None:
    """The upstream connection for an accepted client, or None: the upstream refused
    (the client is aborted) or the client gave up meanwhile (the upstream is closed)."""
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_connection(factory, *upstream)
    except OSError as exc:
        print(f"upstream {upstream[0]}:{upstream[1]}: {exc}", flush=True)
        client.abort()
        return None
    if client.is_closing():
        transport.close()
        return None
    return transport, protocol


class Forwarded(asyncio.Protocol):
    """A side whose bytes loop.forward() moves: it never reads them itself."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        # What arrives before the forward starts is held for it, not delivered here.
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        return True  # half-closed: the other direction may still be flowing


async def forward_both_ways(client: asyncio.Transport, upstream: asyncio.Transport) -> None:
    """Both directions at once until each has passed its EOF on; an error in either
    (a reset) aborts both connections, which ends the other direction too."""
    loop = asyncio.get_running_loop()

    async def one_way(src: asyncio.Transport, dst: asyncio.Transport) -> None:
        try:
            await loop.forward(src, dst)  # type: ignore[attr-defined]
        except OSError:
            client.abort()
            upstream.abort()

    await asyncio.gather(one_way(client, upstream), one_way(upstream, client))
    client.close()
    upstream.close()


class SplicedClientSide(Forwarded):
    """The accepted connection of the default (forwarding) proxy."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.task = asyncio.get_running_loop().create_task(self.serve())

    async def serve(self) -> None:
        connected = await connect_upstream(self.transport, self.upstream, Forwarded)
        if connected is not None:
            await forward_both_ways(self.transport, connected[0])


class Pipe(asyncio.Protocol):
    """One direction's reader: what this side receives is written to the peer side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.got_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.got_eof = True
        peer = self.peer.transport if self.peer else None
        if peer is None or not peer.can_write_eof() or self.peer.got_eof:  # type: ignore[union-attr]
            return False  # nothing more can flow either way: close both sides
        peer.write_eof()
        return True  # keep our side open: the answer may still come back through it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # flushes what is still buffered, then closes

    # The peer's transport is full: stop reading here until it drains.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class ClientSide(Pipe):
    """The accepted connection; it holds its reads until the upstream is connected."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()  # type: ignore[union-attr]
        asyncio.get_running_loop().create_task(self.connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            # uvloop starts reading after connection_made() whatever it paused: keep
            # what comes before the upstream is there
            self.early.append(data)
        else:
            super().data_received(data)

    async def connect(self) -> None:
        connected = await connect_upstream(self.transport, self.upstream, Pipe)  # type: ignore[arg-type]
        if connected is None:
            return
        upstream: Pipe = connected[1]  # type: ignore[assignment]
        self.peer, upstream.peer = upstream, self
        for data in self.early:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self.early.clear()
        self.transport.resume_reading()  # type: ignore[union-attr]


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def main(
    listen: tuple[str, int],
    upstream: tuple[str, int],
    copy: bool = False,
    announce: Callable[[asyncio.AbstractServer], None] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    spliced = not copy and hasattr(loop, "forward")
    factory = SplicedClientSide if spliced else ClientSide
    server = await loop.create_server(lambda: factory(upstream), *listen)
    host, port = server.sockets[0].getsockname()[:2]
    print(
        f"tcp proxy on {type(loop).__name__} listening on {host}:{port}, "
        f"forwarding to {upstream[0]}:{upstream[1]} "
        f"({'spliced in the kernel' if spliced else 'copied'})",
        flush=True,
    )
    if announce is not None:
        announce(server)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--listen", type=address, default=("127.0.0.1", 9000))
    ap.add_argument("--upstream", type=address, required=True)
    ap.add_argument("--copy", action="store_true", help="copy through user space")
    ap.add_argument("--loop", choices=("uringloop", "uvloop", "asyncio"), default="uringloop")
    args = ap.parse_args()
    if args.loop != "uringloop" and not args.copy:
        ap.error("only uringloop forwards inside the kernel: add --copy")
    try:
        if args.loop == "uringloop":
            uringloop.run(main(args.listen, args.upstream, args.copy))
        else:
            if args.loop == "uvloop":
                import uvloop

                uvloop.install()
            asyncio.run(main(args.listen, args.upstream, args.copy))
    except KeyboardInterrupt:
        pass
