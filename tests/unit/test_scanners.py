"""clamd and rspamd clients against small fake servers (protocol edge cases).

The real daemons are exercised in tests/integration/test_virus*.py and test_spam*.py.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.scanners.clamd import (
    ClamdClient,
    ClamdError,
    ClamdSizeLimit,
    ClamdTimeout,
    ClamdUnavailable,
)
from gateway.scanners.rspamd import RspamdClient, RspamdError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_instream(reader: asyncio.StreamReader, limit: int | None = None) -> bytes | None:
    """Read one INSTREAM upload (after IDSESSION on a new session); None once more than
    ``limit`` bytes came."""
    command = await reader.readuntil(b"\0")
    if command == b"zIDSESSION\0":
        command = await reader.readuntil(b"\0")
    assert command == b"zINSTREAM\0"
    data = b""
    for _ in range(100_000):
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        if length == 0:
            return data
        data += await reader.readexactly(length)
        if limit is not None and len(data) > limit:
            return None
    raise AssertionError("too many chunks")


@pytest.fixture
async def unix_server(tmp_path: Path) -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        path = tmp_path / f"clamd{len(servers)}.sock"
        servers.append(await asyncio.start_unix_server(handler, str(path)))
        return f"unix:{path}"

    yield start
    for server in servers:
        server.close()


async def tcp_server(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


# -- clamd ------------------------------------------------------------------------------------


async def test_clamd_clean_and_found_over_unix_with_chunks(unix_server) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await read_instream(reader)
        assert data is not None
        seen.append(data)
        writer.write(b"stream: Evil.Test FOUND\0" if b"EVIL" in data else b"stream: OK\0")
        await writer.drain()
        writer.close()

    client = ClamdClient(await unix_server(handler), timeout=5, chunk_size=1000)
    payload = b"x" * 2500 + b"EVIL"
    result = await client.scan(payload)
    assert result.virus == "Evil.Test" and result.infected
    assert (await client.scan(b"hello")).virus is None
    assert seen == [payload, b"hello"]


async def test_clamd_session_is_reused_and_ids_are_stripped(unix_server) -> None:
    connections = 0

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for number in range(1, 4):
            data = await read_instream(reader)
            verdict = b"Evil.Test FOUND" if data and b"EVIL" in data else b"OK"
            writer.write(b"%d: stream: %s\0" % (number, verdict))
            await writer.drain()
        writer.close()  # like clamd's IdleTimeout: the next scan must reconnect

    client = ClamdClient(await unix_server(session), timeout=5)
    results = [await client.scan(data) for data in (b"a", b"EVIL", b"b", b"c")]
    assert [r.virus for r in results] == [None, "Evil.Test", None, None]
    assert results[0].reply == "stream: OK"
    assert connections == 2
    await client.close()


async def test_clamd_over_tcp() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_instream(reader)
        writer.write(b"stream: OK\0")
        writer.close()

    server, port = await tcp_server(handler)
    async with server:
        assert (await ClamdClient(f"tcp:127.0.0.1:{port}", 5).scan(b"data")).virus is None


async def test_clamd_size_limit_while_still_sending(unix_server) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_instream(reader, limit=1024) is None
        writer.write(b"INSTREAM size limit exceeded. ERROR\0")
        await writer.drain()
        writer.close()

    client = ClamdClient(await unix_server(handler), timeout=5, chunk_size=512)
    with pytest.raises(ClamdSizeLimit):
        await client.scan(b"y" * 2_000_000)


async def test_clamd_down_timeout_and_error_reply(unix_server, tmp_path: Path) -> None:
    with pytest.raises(ClamdUnavailable):
        await ClamdClient(f"unix:{tmp_path}/nobody.sock", 1).scan(b"x")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    with pytest.raises(ClamdTimeout):
        await ClamdClient(await unix_server(silent), timeout=0.2).scan(b"x")

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_instream(reader)
        writer.write(b"lstat() failed. ERROR\0")
        writer.close()

    with pytest.raises(ClamdError, match="lstat"):
        await ClamdClient(await unix_server(broken), timeout=2).scan(b"x")

    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    with pytest.raises(ClamdError):
        await ClamdClient(await unix_server(hangs_up), timeout=2).scan(b"x" * 100_000)


# -- rspamd -----------------------------------------------------------------------------------

REPLY = {
    "action": "reject",
    "score": 15.5,
    "required_score": 15,
    "symbols": {"GTUBE": {"name": "GTUBE", "score": 15}},
}


async def read_request(reader: asyncio.StreamReader) -> tuple[list[str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode().split("\r\n")
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    return lines, await reader.readexactly(length)


def response(body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_rspamd_request_headers_and_keepalive() -> None:
    requests: list[tuple[list[str], bytes]] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(10):
            request = await read_request(reader)
            if request is None:
                break
            requests.append(request)
            writer.write(response(json.dumps(REPLY).encode()))
            await writer.drain()
        writer.close()

    server, port = await tcp_server(handler)
    async with server:
        client = RspamdClient(f"http://127.0.0.1:{port}", timeout=5)
        for _ in range(3):
            reply = await client.check(
                b"Subject: x\r\n\r\nbody\r\n",
                ip="127.0.0.9",
                helo="client.example",
                mail_from="alice@example.com",
                rcpts=["b@example.net", "c@example.org"],
                user="alice@example.com",
            )
            assert reply["action"] == "reject"
        await client.close()
    assert connections == 1, "the connection is kept alive and reused"
    lines, body = requests[0]
    assert lines[0] == "POST /checkv2 HTTP/1.1"
    for expected in (
        "IP: 127.0.0.9",
        "Helo: client.example",
        "From: alice@example.com",
        "Rcpt: b@example.net",
        "Rcpt: c@example.org",
        "User: alice@example.com",
    ):
        assert expected in lines
    assert body == b"Subject: x\r\n\r\nbody\r\n"


async def test_rspamd_large_message_arrives_whole_in_chunks() -> None:
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            request = await read_request(reader)
            if request is None:
                break
            bodies.append(request[1])
            writer.write(response(json.dumps(REPLY).encode()))
            await writer.drain()
        writer.close()

    big = b"Subject: big\r\n\r\n" + bytes(range(256)) * 5000  # 1.2 MB: several chunks
    server, port = await tcp_server(handler)
    async with server:
        client = RspamdClient(f"http://127.0.0.1:{port}", timeout=5)
        assert (await client.check(big))["score"] == 15.5
        assert (await client.check(b"small"))["score"] == 15.5
        await client.close()
    assert bodies == [big, b"small"]


async def test_rspamd_reconnects_when_server_closed_idle_connection() -> None:
    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(json.dumps(REPLY).encode()))  # keep-alive, but then closes
        await writer.drain()
        writer.close()

    server, port = await tcp_server(one_shot)
    async with server:
        client = RspamdClient(f"http://127.0.0.1:{port}", timeout=5)
        for _ in range(3):
            assert (await client.check(b"x"))["score"] == 15.5
            await asyncio.sleep(0.01)
        await client.close()


async def test_rspamd_chunked_and_connection_close() -> None:
    body = json.dumps(REPLY).encode()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        writer.write(head.encode())
        for part in (body[:10], body[10:]):
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server, port = await tcp_server(handler)
    async with server:
        client = RspamdClient(f"http://127.0.0.1:{port}", timeout=5)
        assert (await client.check(b"x"))["action"] == "reject"
        assert client._idle == []


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 500 Internal\r\nContent-Length: 5\r\n\r\nerror",
        response(b"not json"),
        response(b'{"no": "action"}'),
        b"garbage\r\n\r\n",
    ],
    ids=["http-500", "not-json", "no-action", "bad-status-line"],
)
async def test_rspamd_bad_replies(reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server, port = await tcp_server(handler)
    async with server:
        with pytest.raises(RspamdError):
            await RspamdClient(f"http://127.0.0.1:{port}", timeout=5).check(b"x")


async def test_rspamd_down_and_timeout() -> None:
    server, port = await tcp_server(lambda r, w: asyncio.sleep(5))
    async with server:
        with pytest.raises(RspamdError, match="did not answer"):
            await RspamdClient(f"http://127.0.0.1:{port}", timeout=0.2).check(b"x")
    with pytest.raises(RspamdError, match="cannot connect"):
        await RspamdClient(f"http://127.0.0.1:{port}", timeout=1).check(b"x")


def test_rspamd_header_values_cannot_split_the_request() -> None:
    from gateway.scanners.rspamd import _request

    raw = _request("/checkv2", "h", [("Helo", "evil\r\nX-Injected: 1")], b"")
    assert b"\r\nX-Injected" not in raw


async def test_rspamd_over_a_unix_socket(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        assert request is not None
        seen.append(request[0])
        writer.write(response(json.dumps(REPLY).encode(), "Connection: close\r\n"))
        await writer.drain()
        writer.close()

    path = tmp_path / "rspamd.sock"
    server = await asyncio.start_unix_server(handler, str(path))
    async with server:
        client = RspamdClient(f"unix:{path}", timeout=5)
        assert (await client.check(b"x", ip="127.0.0.9"))["action"] == "reject"
        assert (await client.check(b"y"))["score"] == 15.5
    assert seen[0][0] == "POST /checkv2 HTTP/1.1" and "Host: localhost" in seen[0]
    with pytest.raises(RspamdError, match="cannot connect"):
        await RspamdClient(f"unix:{tmp_path}/none.sock", timeout=1).check(b"x")
