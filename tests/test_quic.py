"""aioquic (pure asyncio QUIC and HTTP/3) over the loops' datagram transports.

aioquic drives its connections with create_datagram_endpoint, sendto() from its
timers and datagram_received(), so a QUIC handshake with TLS 1.3, stream data in both
directions and HTTP/3 requests exercise the datagram transport the way a real
application does: bursts of datagrams per iteration, connected and unconnected
endpoints, timers rescheduled from datagram callbacks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

aioquic = pytest.importorskip("aioquic")
from aioquic.asyncio import connect, serve  # noqa: E402
from aioquic.asyncio.protocol import QuicConnectionProtocol  # noqa: E402
from aioquic.h3.connection import H3_ALPN, H3Connection  # noqa: E402
from aioquic.h3.events import DataReceived, HeadersReceived  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

CERTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs")


def server_configuration(alpn: list[str]) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=alpn)
    path = os.path.join(CERTS, "keycert.pem")
    config.load_cert_chain(path, path)
    return config


def client_configuration(alpn: list[str]) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name="localhost")
    config.load_verify_locations(os.path.join(CERTS, "ca.pem"))
    return config


async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()
    writer.write(hashlib.sha256(data).digest() + data)
    writer.write_eof()


@pytest.mark.asyncio
async def test_quic_streams_echo_through_the_datagram_transport():
    server = await serve(
        "127.0.0.1",
        0,
        configuration=server_configuration(["echo"]),
        stream_handler=lambda r, w: asyncio.ensure_future(echo_stream(r, w)),
    )
    port = server._transport.get_extra_info("sockname")[1]
    try:
        async with connect(
            "127.0.0.1", port, configuration=client_configuration(["echo"])
        ) as client:
            await asyncio.wait_for(client.ping(), 10)

            async def one(size: int) -> None:
                reader, writer = await client.create_stream()
                payload = os.urandom(size)
                writer.write(payload)
                writer.write_eof()
                echoed = await reader.read()
                assert echoed[:32] == hashlib.sha256(payload).digest()
                assert echoed[32:] == payload

            # many streams at once, up to a few MB: hundreds of datagrams per iteration
            sizes = [1, 1000, 65536, 1 << 20, 3 << 20] + [4096] * 40
            await asyncio.wait_for(asyncio.gather(*(one(n) for n in sizes)), 60)
    finally:
        server.close()


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.responses: dict[int, asyncio.Future] = {}
        self.bodies: dict[int, bytearray] = {}

    def quic_event_received(self, event) -> None:
        for h3_event in self.http.handle_event(event):
            if isinstance(h3_event, DataReceived):
                self.bodies.setdefault(h3_event.stream_id, bytearray()).extend(h3_event.data)
                if h3_event.stream_ended:
                    self.responses[h3_event.stream_id].set_result(
                        bytes(self.bodies[h3_event.stream_id])
                    )

    async def get(self, path: str) -> bytes:
        stream_id = self._quic.get_next_available_stream_id()
        self.http.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self.responses[stream_id] = asyncio.get_running_loop().create_future()
        self.transmit()
        return await self.responses[stream_id]


class H3Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http: H3Connection | None = None

    def quic_event_received(self, event) -> None:
        if self.http is None:
            self.http = H3Connection(self._quic)
        for h3_event in self.http.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                path = dict(h3_event.headers)[b":path"].decode()
                size = int(path.rsplit("/", 1)[1])
                body = bytes(range(256)) * (size // 256) + bytes(size % 256)
                self.http.send_headers(
                    h3_event.stream_id,
                    [(b":status", b"200"), (b"content-length", str(size).encode())],
                )
                self.http.send_data(h3_event.stream_id, body, end_stream=True)
                self.transmit()


@pytest.mark.asyncio
async def test_http3_requests_over_quic():
    server = await serve(
        "127.0.0.1", 0, configuration=server_configuration(H3_ALPN), create_protocol=H3Server
    )
    port = server._transport.get_extra_info("sockname")[1]
    try:
        async with connect(
            "127.0.0.1",
            port,
            configuration=client_configuration(H3_ALPN),
            create_protocol=H3Client,
        ) as client:
            for size in (0, 13, 100_000, 2_000_000):
                body = await asyncio.wait_for(client.get(f"/bytes/{size}"), 30)
                assert len(body) == size
                assert body == bytes(range(256)) * (size // 256) + bytes(size % 256)
            many = await asyncio.wait_for(
                asyncio.gather(*(client.get("/bytes/5000") for _ in range(50))), 30
            )
            assert all(len(b) == 5000 for b in many)
    finally:
        server.close()
