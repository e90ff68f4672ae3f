"""A small asyncio client for clamd's INSTREAM command (Unix socket or TCP).

Protocol (clamd(8)): send ``zINSTREAM\\0``, then the data as chunks of a 4-byte big-endian
length followed by that many bytes, then a zero length.  clamd answers with one null-terminated
line: ``stream: OK``, ``stream: <name> FOUND`` or ``<text> ERROR``; when the stream exceeds its
``StreamMaxLength`` it answers ``INSTREAM size limit exceeded. ERROR`` and closes the socket,
possibly while we are still writing.

Connections are kept as clamd sessions (``IDSESSION``: several commands on one connection,
each reply prefixed with its number) and reused, one scan at a time per connection; a message
that fits one chunk goes out in a single write.  Measured on the bench machine, this halves
the relay's CPU per scan against a connection per scan (0.08 against 0.2-0.3 ms).  A kept
session that clamd closed meanwhile (its IdleTimeout) is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import re
import struct
from dataclasses import dataclass

from gateway.config import VirusSection, parse_host_port

CHUNK_SIZE = 256 * 1024
MAX_REPLY = 64 * 1024
_END = struct.pack(">I", 0)
_SESSION_ID = re.compile(r"^\d+: ")


class ClamdError(Exception):
    """clamd could not give a verdict: down, too slow, or an error reply."""


class ClamdUnavailable(ClamdError):
    """No connection to clamd, or the connection broke."""


class ClamdTimeout(ClamdError):
    """clamd did not answer within the configured timeout."""


class ClamdSizeLimit(ClamdError):
    """The message is larger than clamd's StreamMaxLength: it was not scanned."""


@dataclass(frozen=True)
class ScanResult:
    """A finished scan: ``virus`` is the signature name, or None when the data is clean."""

    virus: str | None
    reply: str

    @property
    def infected(self) -> bool:
        return self.virus is not None


class ClamdClient:
    """``await ClamdClient("unix:/run/clamav/clamd.ctl", timeout=60).scan(data)``."""

    def __init__(
        self, endpoint: str, timeout: float = 60.0, chunk_size: int = CHUNK_SIZE, max_idle: int = 16
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_idle = max_idle
        self._idle: list[_Session] = []

    @classmethod
    def from_config(cls, section: VirusSection) -> ClamdClient:
        """From the ``[virus]`` section (``clamd``, ``timeout``)."""
        return cls(section.clamd, section.timeout)

    async def scan(self, data: bytes) -> ScanResult:
        """Scan ``data``; raise :class:`ClamdError` (or a subclass) when there is no verdict."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._scan(data)
        except TimeoutError:
            raise ClamdTimeout(
                f"clamd at {self.endpoint} did not answer within {self.timeout:g}s"
            ) from None

    async def ping(self) -> bool:
        """True if clamd answers PING with PONG within the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._connect()
                try:
                    writer.write(b"zPING\0")
                    await writer.drain()
                    return await _read_reply(reader) == "PONG"
                finally:
                    writer.close()
        except (OSError, TimeoutError, ClamdError):
            return False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self.endpoint.startswith("unix:"):
                return await asyncio.open_unix_connection(self.endpoint[5:])
            host, port = parse_host_port(self.endpoint[4:])
            return await asyncio.open_connection(host, port)
        except OSError as exc:
            raise ClamdUnavailable(f"cannot connect to clamd at {self.endpoint}: {exc}") from None

    async def close(self) -> None:
        """Close the idle sessions."""
        idle, self._idle = self._idle, []
        for session in idle:
            session.writer.close()

    async def _acquire(self, fresh: bool = False) -> _Session:
        while self._idle and not fresh:
            session = self._idle.pop()
            if not session.reader.at_eof() and not session.writer.is_closing():
                session.reused = True
                return session
            session.writer.close()
        reader, writer = await self._connect()
        # A session: many INSTREAMs on one connection; replies carry "<n>: " in front.
        writer.write(b"zIDSESSION\0")
        return _Session(reader, writer)

    def _release(self, session: _Session, keep: bool) -> None:
        if keep and len(self._idle) < self.max_idle:
            self._idle.append(session)
        else:
            session.writer.close()

    async def _scan(self, data: bytes) -> ScanResult:
        session = await self._acquire()
        try:
            return await self._scan_on(session, data)
        except _StaleSession:
            # clamd closed the idle session meanwhile (IdleTimeout): nothing was scanned.
            return await self._scan_on(await self._acquire(fresh=True), data)

    async def _scan_on(self, session: _Session, data: bytes) -> ScanResult:
        keep = False
        # Read while sending in chunks: clamd answers early when the size limit is hit and
        # then closes; a reply read before the close cannot be lost to the reset that follows.
        # A message sent in one write needs no reader task (and no extra turn of the loop):
        # the transport buffers whatever clamd answers meanwhile.
        reply_task = None
        if len(data) > self.chunk_size:
            reply_task = asyncio.ensure_future(_read_reply(session.reader))
            await asyncio.sleep(0)  # let the reader wait for data before anything can arrive
        try:
            write_error = await self._send_stream(session.writer, data, reply_task)
            try:
                reply = await (reply_task or _read_reply(session.reader))
            except (OSError, asyncio.IncompleteReadError) as exc:
                if session.reused:
                    raise _StaleSession from None
                # Over TCP the reset after clamd's early close (size limit) can destroy its
                # reply before we read it: say what is most likely.
                raise ClamdUnavailable(
                    f"connection to clamd broke before its reply to {len(data)} bytes (clamd "
                    f"stopped, or the message is larger than its StreamMaxLength?): "
                    f"{write_error or exc!r}"
                ) from None
            result = _parse_reply(_SESSION_ID.sub("", reply, count=1), self.endpoint)
            keep = True
            return result
        finally:
            if reply_task is not None:
                reply_task.cancel()
            self._release(session, keep)

    async def _send_stream(
        self, writer: asyncio.StreamWriter, data: bytes, reply: asyncio.Future[str] | None
    ) -> OSError | None:
        """Send the INSTREAM command and the chunks, stopping early if clamd has answered.  A
        write error is returned, not raised: clamd's reply may still be there to read."""
        try:
            if len(data) <= self.chunk_size:  # the usual mail: one write, one system call
                writer.write(b"zINSTREAM\0" + struct.pack(">I", len(data)) + data + _END)
                await writer.drain()
                return None
            view = memoryview(data)
            writer.write(b"zINSTREAM\0")
            for start in range(0, len(view), self.chunk_size):
                if reply is not None and reply.done():
                    return None
                chunk = view[start : start + self.chunk_size]
                writer.write(struct.pack(">I", len(chunk)))
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0)  # drain() need not yield: give the reader its turn
            writer.write(_END)
            await writer.drain()
        except OSError as exc:
            return exc
        return None


@dataclass
class _Session:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False


class _StaleSession(Exception):
    """A kept session turned out closed by clamd before it read anything: retry afresh."""


async def _read_reply(reader: asyncio.StreamReader) -> str:
    """One null-terminated reply (bounded); EOF without a terminator returns what came."""
    try:
        raw = await reader.readuntil(b"\0")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise
        raw = exc.partial
    except asyncio.LimitOverrunError:
        raw = await reader.read(MAX_REPLY)
    return raw.rstrip(b"\0").decode("utf-8", "replace").strip()


def _parse_reply(reply: str, endpoint: str) -> ScanResult:
    if reply.endswith("FOUND"):
        # "stream: Eicar-Signature FOUND" (the name has no spaces in clamd's output)
        name = reply.removeprefix("stream:").removesuffix("FOUND").strip()
        return ScanResult(virus=name or "unknown", reply=reply)
    if reply == "stream: OK":
        return ScanResult(virus=None, reply=reply)
    if "size limit exceeded" in reply:
        raise ClamdSizeLimit(f"clamd at {endpoint}: {reply}")
    raise ClamdError(f"clamd at {endpoint} answered {reply!r}")
