"""The SMTP client: our own connection on asyncio streams (connect, greeting, EHLO, STARTTLS,
replies) and one transaction function for every far end.

With PIPELINING (RFC 2920) offered, MAIL, every RCPT and DATA go in one write and the replies
are read in order: one round trip instead of two or more per recipient.  Without it, each
command waits for its reply.  Either way the replies map to outcomes the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import Config
from gateway.delivery.outcome import BOUNCED, RcptOutcome, Rcpts, code_status, reply_text
from gateway.dsn import status_from_reply
from gateway.log import event
from gateway.queue.model import QueuedMessage
from gateway.tls.dane import match_chain
from gateway.tls.levels import DANE
from gateway.tls.policy import TlsRequirement
from gateway.tls.verify import NO_TLS, TlsOutcome, describe_tls, peer_chain_der

log = logging.getLogger("smg.delivery")

MAX_REPLY_LINE = 65536  # a reply line longer than this is not SMTP
SEND_CHUNK = 256 * 1024  # the message is written in pieces of this size (see send_all)
# A whole (multi-line) reply: an EHLO reply has a few dozen lines; a far end sending endless
# continuation lines is cut off here instead of growing our memory (issue 12).
MAX_REPLY_LINES = 512
MAX_REPLY_BYTES = 65536

Reply = tuple[int, str]  # code, text


@dataclass(frozen=True)
class Target:
    """One address to try: the host name (for TLS and logs), its IP and port."""

    host: str
    ip: str
    port: int

    @property
    def relay(self) -> str:
        return f"{self.host}[{self.ip}]:{self.port}"


class Disconnected(Exception):
    """The connection broke: closed, reset, a malformed reply, or no reply in time."""


class HostFailed(Exception):
    """This address could not take the mail (connect, greeting, EHLO, TLS): try the next."""

    def __init__(self, reply: str, *, tls: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.tls = tls


class Lost(Exception):
    """The session broke inside a transaction (``during_data``: after DATA was sent)."""

    def __init__(self, reply: str, *, during_data: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.during_data = during_data


# --- the connection -------------------------------------------------------------------------


class SmtpConnection:
    """One SMTP client connection: commands out, replies in, nothing hidden."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout  # for each reply
        self.extensions: dict[str, str] = {}  # EHLO keyword (lower case) -> parameters

    @classmethod
    async def connect(
        cls, target: Target, source: tuple[str, int] | None, connect_timeout: float, timeout: float
    ) -> SmtpConnection:
        """Connect and read the greeting (both within ``connect_timeout``)."""
        where = f"{target.ip} on port {target.port}"
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    target.ip, target.port, local_addr=source, limit=MAX_REPLY_LINE
                )
        except TimeoutError as exc:
            raise HostFailed(f"Timed out connecting to {where}") from exc
        except OSError as exc:
            raise HostFailed(f"Error connecting to {where}: {exc}") from exc
        connection = cls(reader, writer, timeout)
        try:
            code, text = await connection.reply(connect_timeout)
        except Disconnected as exc:
            connection.close()
            raise HostFailed(str(exc)) from exc
        if code != 220:
            connection.close()
            raise HostFailed(reply_text(code, text))
        return connection

    @property
    def is_connected(self) -> bool:
        return not self._writer.is_closing() and not self._reader.at_eof()

    @property
    def pipelining(self) -> bool:
        """The far end offered PIPELINING: transactions go in one write."""
        return "pipelining" in self.extensions

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._writer.get_extra_info("ssl_object")

    def send(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise Disconnected("connection closed")
        self._writer.write(data)

    async def send_all(self, parts: list[bytes], chunk: int = SEND_CHUNK) -> None:
        """Write ``parts`` a chunk at a time, waiting for the socket between chunks: the
        transport's buffer never holds a copy of a whole large message."""
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), chunk):
                self.send(view[start : start + chunk])  # type: ignore[arg-type]
                try:  # a far end that reads nothing for a whole timeout is gone
                    await asyncio.wait_for(self._writer.drain(), self.timeout)
                except TimeoutError as exc:
                    raise Disconnected("Timed out sending the message") from exc

    async def reply(self, timeout: float | None = None) -> Reply:
        """The next reply: its code and its text (the lines of a multi-line reply joined)."""
        return (await self.replies(1, timeout))[0]

    async def replies(self, count: int, timeout: float | None = None) -> list[Reply]:
        """The next ``count`` replies (to pipelined commands), all within one timeout."""
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                return [await self._read_reply() for _ in range(count)]
        except TimeoutError as exc:
            raise Disconnected("Timed out waiting for server response") from exc
        except ValueError as exc:  # a line longer than MAX_REPLY_LINE
            raise Disconnected(f"reply too long (a line over {MAX_REPLY_LINE} bytes)") from exc
        except OSError as exc:
            raise Disconnected(f"connection lost: {exc}") from exc

    async def _read_reply(self) -> Reply:
        lines: list[bytes] = []
        size = 0
        while True:
            line = await self._reader.readline()
            if not line.endswith(b"\n"):
                raise Disconnected("connection closed by the far end")
            size += len(line)
            if len(lines) >= MAX_REPLY_LINES or size > MAX_REPLY_BYTES:
                raise Disconnected(
                    f"reply too long (more than {MAX_REPLY_LINES} lines or "
                    f"{MAX_REPLY_BYTES} bytes): {(lines or [line])[0][:80]!r}..."
                )
            line = line.rstrip(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                break
        code = lines[-1][:3]
        if not code.isdigit():
            raise Disconnected(f"malformed reply {lines[-1][:80]!r}")
        return int(code), "\n".join(x[4:].decode("utf-8", "replace").strip() for x in lines)

    async def command(self, line: str) -> Reply:
        self.send(line.encode("ascii") + b"\r\n")
        return await self.reply()

    async def ehlo(self, hostname: str) -> None:
        """EHLO; the offered extensions replace those known before (after STARTTLS)."""
        code, text = await self.command(f"EHLO {hostname}")
        if code != 250:
            raise HostFailed(reply_text(code, text))
        self.extensions = {}
        for line in text.split("\n")[1:]:
            keyword, _, parameters = line.partition(" ")
            if keyword:
                self.extensions[keyword.lower()] = parameters

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        code, text = await self.command("STARTTLS")
        if code != 220:
            raise HostFailed(reply_text(code, text))
        async with asyncio.timeout(self.timeout):
            await self._writer.start_tls(context, server_hostname=server_hostname)

    async def quit(self) -> None:
        try:
            await self.command("QUIT")
        finally:
            self.close()

    def close(self) -> None:
        self._writer.close()


# --- opening a session ------------------------------------------------------------------------


class Dialer:
    """Opens sessions as the configuration says: from ``gateway.source_address``, EHLO
    ``gateway.hostname``, STARTTLS whenever offered (TLS contexts kept per requirement)."""

    def __init__(self, config: Config) -> None:
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self.config = config

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._contexts.clear()  # CA bundles may have changed

    def _context(self, requirement: TlsRequirement) -> ssl.SSLContext:
        key = (requirement.level, str(requirement.ca_bundle or ""))
        if key not in self._contexts:
            self._contexts[key] = requirement.ssl_context()
        return self._contexts[key]

    def _source(self, target: Target) -> tuple[str, int] | None:
        source = self.config.gateway.source_address
        if not source:
            return None
        same_family = (
            ipaddress.ip_address(source).version == ipaddress.ip_address(target.ip).version
        )
        return (source, 0) if same_family else None

    async def open(
        self, target: Target, requirement: TlsRequirement
    ) -> tuple[SmtpConnection, TlsOutcome]:
        """A greeted connection, with TLS where the far end offers it or the requirement
        demands it (raises :class:`HostFailed`: try the next address)."""
        connection = await self._connect_ehlo(target)
        if not connection.supports("starttls"):
            if requirement.requires_tls:
                connection.close()
                raise HostFailed("STARTTLS not offered", tls=True)
            return connection, NO_TLS
        try:
            await connection.starttls(self._context(requirement), target.host)
            if requirement.level == DANE:  # before a single command goes over the session
                _authenticate_dane(connection, target, requirement)
            await connection.ehlo(self.config.gateway.hostname)
        except (HostFailed, Disconnected, ssl.SSLError, OSError, TimeoutError) as exc:
            connection.close()
            text = str(exc) or type(exc).__name__
            if requirement.requires_tls:
                raise HostFailed(f"TLS failed: {text}", tls=True) from exc
            # Opportunistic: the handshake failed, so deliver in cleartext (as Postfix does).
            event(log, "tls_fallback", relay=target.relay, error=text,
                  action="cleartext (opportunistic)")  # fmt: skip
            return await self._connect_ehlo(target), NO_TLS
        return connection, describe_tls(connection.ssl_object, target.host, requirement)

    async def _connect_ehlo(self, target: Target) -> SmtpConnection:
        """Connect and greet; any failure closes the connection and becomes HostFailed."""
        delivery = self.config.delivery
        connection = await SmtpConnection.connect(
            target, self._source(target), delivery.connect_timeout, delivery.command_timeout
        )
        try:
            await connection.ehlo(self.config.gateway.hostname)
        except (HostFailed, Disconnected, OSError) as exc:
            connection.close()
            raise HostFailed(str(exc) or type(exc).__name__) from exc
        return connection


def _authenticate_dane(
    connection: SmtpConnection, target: Target, requirement: TlsRequirement
) -> None:
    """RFC 7672 3: the peer's chain must match a usable TLSA record of this MX host."""
    ssl_object = connection.ssl_object
    chain = peer_chain_der(ssl_object) if ssl_object is not None else []
    problem = match_chain(requirement.tlsa, chain, target.host)
    if problem is not None:
        raise HostFailed(f"DANE authentication failed: {problem}", tls=True)


# --- one transaction --------------------------------------------------------------------------


async def transaction(
    connection: SmtpConnection,
    target: Target,
    tls: TlsOutcome,
    message: QueuedMessage,
    rcpts: Rcpts,
    payload: bytes,
) -> list[RcptOutcome]:
    """MAIL, RCPT..., DATA and the message for ``rcpts``; one outcome per recipient.

    Raises :class:`Lost` if the connection breaks (or the far end says 421 to MAIL)."""

    def far(position: int, address: str, code: int, text: str) -> RcptOutcome:
        return RcptOutcome(position, address, code_status(code), reply_text(code, text),
                           status_from_reply(code, text), target.host, target.relay, tls,
                           from_far_end=True)  # fmt: skip

    def ours(reply: str, enhanced: str) -> list[RcptOutcome]:
        return [RcptOutcome(p, a, BOUNCED, reply, enhanced, target.host, target.relay, tls)
                for p, a in rcpts]  # fmt: skip

    options, encoding = mail_options(connection, message, rcpts, payload)
    if options is None:
        return ours("the far end does not support SMTPUTF8, which this message needs", "5.6.7")
    if not _clean_address(message.sender) or not all(_clean_address(a) for _, a in rcpts):
        return ours("address with control characters", "5.1.3")
    commands = [f"MAIL FROM:<{message.sender}>{''.join(' ' + o for o in options)}"]
    commands += [f"RCPT TO:<{address}>" for _, address in rcpts]
    commands.append("DATA")
    try:
        mail, rcpt_replies, data_reply = await _envelope(connection, commands, encoding)
    except (Disconnected, OSError) as exc:
        raise Lost(f"connection lost: {exc}", during_data=False) from exc
    if mail[0] == 421:
        raise Lost(reply_text(*mail), during_data=False)
    if mail[0] >= 300:
        await _abort(connection, data_reply)
        return [far(p, a, *mail) for p, a in rcpts]
    replies = list(zip(rcpts, rcpt_replies, strict=True))
    accepted = [(p, a) for (p, a), reply in replies if reply[0] < 300]
    refused = [far(p, a, *reply) for (p, a), reply in replies if reply[0] >= 300]
    if data_reply is None or data_reply[0] != 354:
        await _abort(connection, data_reply)
        return refused + [far(p, a, *data_reply) for p, a in accepted if data_reply]
    try:
        await connection.send_all(data_parts(payload))
        final = await connection.reply()
    except (Disconnected, OSError) as exc:
        raise Lost(f"connection lost during DATA: {exc}", during_data=True) from exc
    return refused + [far(p, a, *final) for p, a in accepted]


async def _envelope(
    connection: SmtpConnection, commands: list[str], encoding: str
) -> tuple[Reply, list[Reply], Reply | None]:
    """The replies to MAIL, each RCPT and DATA.  Pipelined: all in one write.  Otherwise one
    command at a time, stopping where the rest cannot succeed (MAIL refused, no recipient
    accepted): then the replies not asked for are missing (DATA's is None)."""
    wire = [f"{line}\r\n".encode(encoding) for line in commands]
    if connection.pipelining:
        connection.send(b"".join(wire))
        replies = await connection.replies(len(wire))
        return replies[0], replies[1:-1], replies[-1]
    connection.send(wire[0])
    mail = await connection.reply()
    if mail[0] >= 300:
        return mail, [], None
    rcpt_replies = []
    for line in wire[1:-1]:
        connection.send(line)
        rcpt_replies.append(await connection.reply())
    if all(code >= 300 for code, _ in rcpt_replies):
        return mail, rcpt_replies, None
    connection.send(wire[-1])
    return mail, rcpt_replies, await connection.reply()


async def _abort(connection: SmtpConnection, data_reply: Reply | None) -> None:
    """End a transaction that will not send its message (RSET; a 354 needs the dot)."""
    with contextlib.suppress(Disconnected, OSError):
        if data_reply is not None and data_reply[0] == 354:
            connection.send(b".\r\n")  # a far end that said 354 with no recipient: end it
            await connection.reply()
        connection.send(b"RSET\r\n")
        await connection.reply()


def mail_options(
    connection: SmtpConnection, message: QueuedMessage, rcpts: Rcpts, payload: bytes
) -> tuple[list[str] | None, str]:
    """MAIL FROM parameters and the commands' encoding; None: SMTPUTF8 needed, not offered."""
    options: list[str] = []
    encoding = "ascii"
    if _needs_smtputf8(message.sender, [a for _, a in rcpts]) or message.facts.get("smtputf8"):
        if not connection.supports("smtputf8"):
            return None, encoding
        options.append("SMTPUTF8")
        encoding = "utf-8"
    if not payload.isascii() and connection.supports("8bitmime"):
        options.append("BODY=8BITMIME")
    return options, encoding


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _clean_address(address: str) -> bool:
    """No CR, LF or other control characters (they would inject commands)."""
    return _CONTROL_CHARACTERS.search(address) is None


def _needs_smtputf8(sender: str, recipients: Sequence[str]) -> bool:
    return not all(a.isascii() for a in (sender, *recipients))


# --- message bytes --------------------------------------------------------------------------


def strip_header(data: bytes, name: str) -> bytes:
    """``data`` without every ``name:`` header field (folded lines included); the body is
    untouched."""
    end = re.search(rb"\r?\n\r?\n", data)
    if end:
        split = end.start() + (2 if data[end.start() : end.start() + 1] == b"\r" else 1)
    else:
        split = len(data)
    head = data[:split]  # the body is copied only when a field goes (usually none does)
    wanted = name.lower().encode("ascii") + b":"
    if wanted not in head.lower():
        return data
    rest = data[split:]  # the empty line, then the body
    kept: list[bytes] = []
    dropping = False
    for line in re.split(rb"(?<=\n)", head):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(wanted)
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest


def wire_bytes(data: bytes) -> bytes:
    """The message ending in a line end (:func:`data_block` makes the rest of the wire form)."""
    return data if data.endswith(b"\n") else data + b"\r\n"


_LINE_ENDS = re.compile(rb"\r\n|\n|\r")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def data_block(data: bytes) -> bytes:
    """The message as sent after a 354: CRLF line ends, dot-stuffed, ending in CRLF.CRLF."""
    return b"".join(data_parts(data))


def data_parts(data: bytes) -> list[bytes]:
    """:func:`data_block` in parts, so that a message already in wire form (CRLF, nothing to
    stuff: the usual case) is sent as it is, without a copy of it with the end line added."""
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = _LINE_ENDS.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        return [data, b"\r\n.\r\n"]
    return [data, b".\r\n"]
