"""Issue 12, point 7: a far end cannot make the relay hold an unbounded reply.

Loopback fake peers: an SMTP far end whose EHLO reply is one 10 MiB line, or 100k continuation
lines; a clamd that answers with 10 MiB and no terminator.  Each time the relay gives up with a
reason (the delivery's deferral reason, or clamd's "no verdict") and closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.delivery.client import MAX_REPLY_LINES, Dialer, HostFailed, Target
from gateway.scanners.clamd import ClamdClient, ClamdError

TEN_MIB = 10 * 1024 * 1024
Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakePeer:
    """A loopback server running ``serve`` per connection; ``closed`` is set when the relay
    closed the connection on it (EOF or a reset while the peer was still talking)."""

    def __init__(self, serve: Peer) -> None:
        self.serve = serve
        self.closed = asyncio.Event()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.serve(reader, writer)
            await reader.read()  # until the relay closes
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            writer.close()


@pytest.fixture
async def far_end() -> AsyncIterator[Callable[[Peer], Awaitable[FakePeer]]]:
    servers: list[asyncio.Server] = []

    async def start(serve: Peer) -> FakePeer:
        peer = FakePeer(serve)
        server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
        servers.append(server)
        peer.port = server.sockets[0].getsockname()[1]
        return peer

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def dialer() -> Dialer:
    return Dialer(
        parse_config(
            {
                "gateway": {"hostname": "gw.example.net"},
                "delivery": {"connect_timeout": "10s", "command_timeout": "10s"},
                "spam": {"enabled": False},
            }
        )
    )


async def ehlo_reply(peer_reply: bytes, far_end) -> tuple[HostFailed, FakePeer]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 far.test ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(peer_reply)
        await writer.drain()

    peer = await far_end(serve)
    with pytest.raises(HostFailed) as caught:
        await dialer()._connect_ehlo(Target("far.test", "127.0.0.1", peer.port))
    await asyncio.wait_for(peer.closed.wait(), 10)
    return caught.value, peer


async def test_a_10_mib_reply_line_closes_with_a_reason(far_end) -> None:
    failed, _ = await ehlo_reply(b"250-far.test " + b"x" * TEN_MIB + b"\r\n250 OK\r\n", far_end)
    assert "reply too long" in failed.reply


async def test_100k_continuation_lines_close_with_a_reason(far_end) -> None:
    lines = b"".join(b"250-EXT%06d\r\n" % i for i in range(100_000))
    failed, _ = await ehlo_reply(b"250-far.test\r\n" + lines + b"250 OK\r\n", far_end)
    assert "reply too long" in failed.reply and str(MAX_REPLY_LINES) in failed.reply


async def test_an_ehlo_reply_of_usual_size_still_works(far_end) -> None:
    lines = b"".join(b"250-EXT%02d\r\n" % i for i in range(40))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 far.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-far.test\r\n" + lines + b"250 PIPELINING\r\n")
        await writer.drain()

    peer = await far_end(serve)
    connection = await dialer()._connect_ehlo(Target("far.test", "127.0.0.1", peer.port))
    assert connection.pipelining and connection.supports("ext39")
    connection.close()


async def test_clamd_answering_10_mib_without_end_is_no_verdict(tmp_path: Path) -> None:
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\0")  # IDSESSION
            await reader.readuntil(b"\0")  # INSTREAM
            writer.write(b"1: stream: " + b"y" * TEN_MIB)
            await writer.drain()
            await reader.read()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            closed.set()
            writer.close()

    socket_path = tmp_path / "clamd.sock"
    server = await asyncio.start_unix_server(serve, str(socket_path))
    try:
        client = ClamdClient(f"unix:{socket_path}", timeout=10)
        with pytest.raises(ClamdError):
            await client.scan(b"Subject: x\r\n\r\nhello\r\n")
        await client.close()
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()
