"""Small SMTP clients that connect from a lab network namespace (the customer host).

- ``RawSmtp``: blocking, sends exactly the bytes it is given (smuggling, bare LF, over-long
  lines: what swaks would correct), reads one reply at a time.
- ``AsyncSmtp``: asyncio, for the load run: one transaction after the other on a session,
  timing the reply to the final dot (the ``250`` the customer's MTA waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from bench.fleet import netns

CRLF = b"\r\n"


@dataclass(frozen=True)
class Reply:
    code: int  # 0 when the server closed the connection instead of replying
    text: str  # every line of the reply, joined with "\n"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return self.text or "<closed>"


CLOSED = Reply(0, "")


def parse_reply(lines: list[bytes]) -> Reply:
    if not lines:
        return CLOSED
    text = "\n".join(line.decode(errors="replace").rstrip("\r\n") for line in lines)
    try:
        code = int(lines[-1][:3])
    except ValueError:
        code = 0
    return Reply(code, text)


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload as sent on the wire: CRLF line ends, leading dots doubled, final dot."""
    body = data.replace(b"\r\n", b"\n").replace(b"\n", CRLF)
    if not body.endswith(CRLF):
        body += CRLF
    lines = [b"." + line if line.startswith(b".") else line for line in body.split(CRLF)]
    return CRLF.join(lines) + b"." + CRLF


class RawSmtp:
    """Blocking SMTP client over a socket from ``netns``; ``banner`` is the greeting."""

    def __init__(self, netns_name: str, address: str, port: int = 25, timeout: float = 15) -> None:
        self.sock = netns.connect(netns_name, address, port, timeout)
        self.file = self.sock.makefile("rb")
        self.banner = self.reply()

    def reply(self) -> Reply:
        lines: list[bytes] = []
        try:
            while True:
                line = self.file.readline(4096)
                if not line:
                    break
                lines.append(line)
                if line[3:4] != b"-":
                    break
        except (TimeoutError, ConnectionError):
            pass
        return parse_reply(lines)

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def cmd(self, line: bytes | str) -> Reply:
        self.send((line.encode() if isinstance(line, str) else line) + CRLF)
        return self.reply()

    def transaction(self, mail_from: str, rcpts: list[str], data: bytes) -> Reply:
        """MAIL, RCPT..., DATA: the first refusal or the reply to the final dot."""
        for line in [f"MAIL FROM:<{mail_from}>", *(f"RCPT TO:<{r}>" for r in rcpts)]:
            reply = self.cmd(line)
            if not reply.ok:
                return reply
        reply = self.cmd("DATA")
        if reply.code != 354:
            return reply
        self.send(dot_stuff(data))
        return self.reply()

    def close(self) -> None:
        # The file object holds a reference to the socket: both must go for the fd to close.
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SmtpSessionError(Exception):
    """The connection failed or closed mid-transaction (the message's fate is unknown)."""


@dataclass(frozen=True)
class Outcome:
    reply: Reply  # the reply that decided: a refusal at MAIL/RCPT/DATA, or the final one
    stage: str  # "mail", "rcpt", "data", "dot"
    latency: float  # seconds from the final dot to its reply (0 unless stage == "dot")


class AsyncSmtp:
    """One SMTP session from ``netns`` (asyncio); transactions run one after the other."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    @classmethod
    async def connect(
        cls, netns_name: str, address: str, port: int = 25, *, timeout: float = 30, ehlo: str
    ) -> AsyncSmtp:
        try:
            reader, writer = await netns.open_connection(netns_name, address, port, timeout)
        except (OSError, TimeoutError) as exc:
            raise SmtpSessionError(f"connect {address}:{port}: {exc!r}") from exc
        session = cls(reader, writer, timeout)
        banner = await session.reply()
        if banner.code != 220:
            await session.close()
            raise SmtpSessionError(f"greeting from {address}: {banner}")
        reply = await session.command(f"EHLO {ehlo}")
        if reply.code != 250:
            await session.close()
            raise SmtpSessionError(f"EHLO at {address}: {reply}")
        return session

    async def reply(self) -> Reply:
        lines: list[bytes] = []
        try:
            while True:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
                if not line:
                    break
                lines.append(line)
                if line[3:4] != b"-":
                    break
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            raise SmtpSessionError(f"no reply: {exc!r}") from exc
        reply = parse_reply(lines)
        if reply.code == 0:
            raise SmtpSessionError("connection closed by the server")
        return reply

    async def command(self, line: str) -> Reply:
        try:
            self.writer.write(line.encode() + CRLF)
            await self.writer.drain()
        except (OSError, ConnectionError) as exc:
            raise SmtpSessionError(f"send {line.split()[0]}: {exc!r}") from exc
        return await self.reply()

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> Outcome:
        reply = await self.command(f"MAIL FROM:<{mail_from}>")
        if not reply.ok:
            return Outcome(reply, "mail", 0.0)
        for rcpt in rcpts:
            reply = await self.command(f"RCPT TO:<{rcpt}>")
            if not reply.ok:
                await self.command("RSET")
                return Outcome(reply, "rcpt", 0.0)
        reply = await self.command("DATA")
        if reply.code != 354:
            return Outcome(reply, "data", 0.0)
        try:
            self.writer.write(dot_stuff(data))
            await self.writer.drain()
        except (OSError, ConnectionError) as exc:
            raise SmtpSessionError(f"send DATA: {exc!r}") from exc
        started = time.monotonic()
        reply = await self.reply()
        return Outcome(reply, "dot", time.monotonic() - started)

    async def close(self) -> None:
        try:
            if not self.writer.is_closing():
                self.writer.write(b"QUIT" + CRLF)
                await asyncio.wait_for(self.writer.drain(), 2)
                await asyncio.wait_for(self.reader.read(512), 2)
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writer.close()


def banner_from(netns_name: str, address: str, port: int = 25, timeout: float = 5) -> str:
    """The greeting a client in ``netns`` gets, or why there was none ("timeout", "refused")."""
    try:
        with RawSmtp(netns_name, address, port, timeout) as client:
            return str(client.banner)
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"error: {exc}"
