"""Child for test_emulated_kernels.py: one loop under URINGLOOP_EMULATE_KERNEL (set by the
parent), some real traffic, and a JSON line saying which paths it took.

TCP: a 1 MiB write (zero-copy when the loop may use it) echoed back through a server;
UDP: 20 KiB datagrams echoed (zero-copy from 16 KiB when it may).
"""

from __future__ import annotations

import asyncio
import json

import uringloop

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.got.put_nowait(data)


async def main() -> dict:
    loop = asyncio.get_running_loop()

    async def handle(reader, writer):
        writer.write(await reader.readexactly(len(PAYLOAD)))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
    writer.write(PAYLOAD)
    tcp_ok = await reader.readexactly(len(PAYLOAD)) == PAYLOAD
    writer.close()
    server.close()
    await server.wait_closed()

    udp_server, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    client, proto = await loop.create_datagram_endpoint(
        UdpClient, remote_addr=udp_server.get_extra_info("sockname")
    )
    datagrams = [bytes([i]) * 20000 for i in range(8)]
    for d in datagrams:
        client.sendto(d)
    got = [await asyncio.wait_for(proto.got.get(), 10) for _ in datagrams]
    client.close()
    udp_server.close()
    await asyncio.sleep(0.05)

    info = loop.ring_info()
    return {
        "setup": info["setup"],
        "restricted": info["restricted"],
        "emulated_kernel": info["emulated_kernel"],
        "recv_multishot": loop._ring.recv_multishot,
        "multishot_accept": loop._multishot_accept,
        "recv_multishot_cqes": info["recv_multishot_cqes"],
        "zc_sends": loop._ring.zerocopy_stats()["zc_sends"],
        "datagram": loop._ring.datagram_stats(),
        "tcp_ok": tcp_ok,
        "udp_ok": sorted(got) == sorted(datagrams),
    }


if __name__ == "__main__":
    print(json.dumps(uringloop.run(main())))
