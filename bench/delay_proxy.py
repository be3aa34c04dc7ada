"""A TCP proxy that delays every byte by a fixed time in each direction: a database "far away".

The product is deployed with its database on another host (Supabase behind Render), where every
statement and every commit costs a network round trip. This VM's kernel has no netem qdisc, so
the bench puts this proxy between the services and PostgreSQL instead:

    python -m bench.delay_proxy --listen 127.0.0.1:6432 --to 127.0.0.1:5432 --delay-ms 2 &
    python -m bench.run --db postgres --pg-url postgres://postgres@127.0.0.1:6432/postgres ...

Data keeps its order and is released `delay` after it arrived (not after the previous piece left),
so the link adds latency, not a bandwidth limit. One asyncio loop; fine for the few dozen
connections a benchmark's database pool holds.
"""

from __future__ import annotations

import argparse
import asyncio
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(release())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, b""))
    try:
        await sender
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, server_writer, delay),
            _pump(server_reader, client_writer, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, *listen)
    print(f"READY {listen[0]}:{server.sockets[0].getsockname()[1]} -> {target[0]}:{target[1]} "
          f"(+{delay * 1000:g} ms each way)", flush=True)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 6432))
    parser.add_argument("--to", type=_address, default=("127.0.0.1", 5432))
    parser.add_argument("--delay-ms", type=float, default=2.0, help="added to each direction")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
