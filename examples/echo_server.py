"""An echo server on uringloop: `python examples/echo_server.py [--port 8888] [--host 127.0.0.1]`.

Try it with `nc 127.0.0.1 8888` or `python examples/echo_server.py --self-test`.
"""

from __future__ import annotations

import argparse
import asyncio

import uringloop


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(host: str, port: int, self_test: bool) -> None:
    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()
    loop = asyncio.get_running_loop()
    print(f"echo server on {type(loop).__name__} listening on {bound[0]}:{bound[1]}", flush=True)
    async with server:
        if self_test:
            reader, writer = await asyncio.open_connection(*bound[:2])
            writer.write(b"hello over io_uring\n")
            print("echoed:", (await reader.readline()).decode().strip())
            writer.close()
            await writer.wait_closed()
            return
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8888)
    ap.add_argument("--self-test", action="store_true", help="echo one line to itself and exit")
    args = ap.parse_args()
    try:
        uringloop.run(main(args.host, args.port, args.self_test))
    except KeyboardInterrupt:
        pass
