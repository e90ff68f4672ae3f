"""A far end that is down in the polite way: it greets every connection with ``421`` and
closes it (a big provider throttling us, or a host shutting down).

    python -m bench.backlog.far HOST PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

GREETING = b"421 4.7.0 far.bench: too many connections, try again later\r\n"


class Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(GREETING)  # type: ignore[attr-defined]
        transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Refuse, host, port, backlog=512)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
