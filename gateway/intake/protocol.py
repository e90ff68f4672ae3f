"""The intake's protocol side: an aiosmtpd ``SMTP`` subclass, protocol rules only.

It parses and checks each command, then asks the handler (``gateway.intake.handler``) for the
reply to MAIL, RCPT and DATA; nothing is written to the spool before the whole message passed
the policy chain, and the ``250`` goes out only after the message is queued (durable).

Protocol rules enforced here (each refusal is a clear reply and the session goes on, except
where it says "close"):

- when a client connects (``Intake.admit``): relay control by the handler (``554 5.7.1``
  instead of the greeting, close); more than ``gateway.max_connections`` sessions:
  ``421 4.7.0`` (close);
- ``idle_timeout`` between commands and ``data_timeout`` for the whole DATA phase:
  ``421 4.4.2`` (close);
- SIZE is advertised; ``552 5.3.4`` for a ``SIZE=`` above ``max_message_size`` and for a
  message that turns out larger (it is read to its end and dropped);
- strict line endings in DATA: only ``<CRLF>.<CRLF>`` ends the data.  A message containing a
  bare CR or a bare LF anywhere is refused with ``550 5.6.11`` - never "normalised" - so no
  ``<LF>.<LF>``, ``<LF>.<CRLF>`` or ``<CR>.<CR>`` trick can end the data early here or at any
  server downstream, and no second message can be smuggled in;
- lines longer than ``max_line_length``: ``550 5.6.0`` for message lines (RFC 5322 2.1.1),
  ``500 5.5.2`` for command lines (RFC 5321 4.5.3.1.4); more than ``MAX_HOPS`` Received:
  headers: ``554 5.4.6`` (a mail loop);
- SMTPUTF8 and 8BITMIME are advertised; a non-ASCII address without ``SMTPUTF8`` on MAIL FROM
  gets ``553 5.6.7``;
- an EHLO/HELO name that is not valid UTF-8 or holds a control character: ``501 5.5.2`` (the
  name goes into the Received: header and the spool's text columns, where it cannot be stored;
  the client may say EHLO again);
- a NUL byte anywhere in the message: ``554 5.6.0`` (RFC 5322 2.1 forbids it, and a next hop
  that drops NULs would see different data); the message is not queued;
- a reply that echoes client text has its control characters and undecodable bytes escaped
  (``printable``), so it stays one line and can always be sent;
- PIPELINING and ENHANCEDSTATUSCODES are advertised; STARTTLS (TLS 1.2 or newer) when
  ``gateway.tls_cert``/``tls_key`` are set; AUTH PLAIN/LOGIN only after STARTTLS and only
  when a tenant has users (``gateway.intake.auth``), else relay control is by network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, syntax

from gateway.addresses import AddressError, split_path
from gateway.budget import DataBudget, Reservation
from gateway.config import Config
from gateway.intake.auth import AuthCommands
from gateway.intake.data import DataPieces
from gateway.intake.deadlines import SessionDeadlines
from gateway.intake.handler import MailOptions, PolicyHandler, Transaction
from gateway.log import event, printable
from gateway.metrics import Metrics
from gateway.tenants import Tenant

log = logging.getLogger("smg.intake")

COMMAND_BUFFER = 8192  # bytes a command line may fill the reader's buffer with
DATA_CHUNK = 65536  # the reader's limit in DATA: its buffer pauses the transport at twice this
MAX_HOPS = 50  # Received: headers before we call it a mail loop (Postfix's hopcount_limit)
IDENT = "ESMTP Secure Mail Gateway"
# aiosmtpd decodes command arguments as UTF-8 with surrogateescape: a surrogate is a byte that
# was not valid UTF-8.  C0, DEL and C1 controls have no place in a domain or address literal.
_BAD_HELO = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class Sessions(Protocol):
    """What a session needs from the listener that made it (``gateway.intake.Intake``)."""

    stopping: bool
    metrics: Metrics
    data_budget: DataBudget  # message bytes in flight, shared by the process's sessions

    def admit(self, session: GatewaySMTP, client_ip: str) -> str | None: ...

    def session_ended(self, session: GatewaySMTP) -> None: ...


# aiosmtpd's own replies, completed with enhanced status codes (RFC 2034 once advertised).
_ENHANCED_DEFAULTS = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.5.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "538": "5.7.11",
    "554": "5.7.0",
}
_HAS_STATUS = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")
_PLAIN_2XX = {"250 OK", "221 Bye", "250 HELP"}


def _with_status(reply: str) -> str:
    if _HAS_STATUS.match(reply) or len(reply) < 4 or reply[3] != " ":
        return reply
    code = reply[:3]
    if code.startswith("2") and reply not in _PLAIN_2XX and not reply.startswith("252"):
        return reply  # greeting, HELO, EHLO lines and other texts keep their form
    status = _ENHANCED_DEFAULTS.get(code)
    return f"{code} {status} {reply[4:]}" if status else reply


class GatewaySMTP(AuthCommands, SessionDeadlines, SMTP):
    """One SMTP session.  MAIL, RCPT and DATA are ours; aiosmtpd does the rest."""

    envelope: Transaction

    def __init__(
        self,
        intake: Sessions,
        config: Config,
        handler: PolicyHandler,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        gateway = config.gateway
        self.intake = intake
        self.config = config
        self.handler = handler
        self.busy = False
        self.client_ip = ""
        self.tenant: Tenant | None = None  # set at connect (network) or by AUTH
        self.counted: Tenant | None = None  # counted in the customer's sessions (listener)
        self._admitted = False
        self._refused = False
        # The reader's buffer limit while reading commands: a client cannot make a session
        # buffer more than this without a line end (aiosmtpd answers 500 and reads on).
        # DATA sets it to DATA_CHUNK for its reads (see _read_data).
        self.line_length_limit = COMMAND_BUFFER
        super().__init__(
            handler,
            data_size_limit=gateway.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=gateway.hostname,
            ident=IDENT,
            tls_context=tls_context,
            require_starttls=gateway.require_tls_from_clients,
            timeout=gateway.idle_timeout,
        )

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None and self._original_transport is None
        if first:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.client_ip = str(peer[0])
            refusal = self.intake.admit(self, self.client_ip)
            if refusal is not None:
                self._refused = True
                transport.write(f"{refusal}\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                return
            self._admitted = True
            named = {"tenant": self.tenant.name} if self.tenant else {}
            event(log, "connect", client=self.client_ip, **named)
            self.start_deadlines()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._admitted:
            self._admitted = False
            self.stop_deadlines()
            self.intake.session_ended(self)
            event(log, "disconnect", client=self.client_ip)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            self.note_bytes()
            super().data_received(data)

    def _timeout_cb(self) -> None:
        if self._line_started:  # a command line begun and not finished: command_deadline
            return self._deadline("command", self.config.gateway.command_deadline)
        self.close_with(f"421 4.4.2 {self.hostname} Timeout, closing the connection")

    def close_with(self, reply: str) -> None:
        """Say ``reply`` and close (timeouts, shutdown)."""
        if self.transport is None:
            return
        with contextlib.suppress(Exception):
            self._writer.write(reply.encode() + b"\r\n")
        self.transport.close()

    def _create_envelope(self) -> Envelope:
        return Transaction()  # RSET, a new EHLO, STARTTLS and the end of DATA make a new one

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            # Replies echo client text (an unknown command, a parameter): a byte that was not
            # UTF-8 could not be encoded (451 and a traceback), a CR would split the reply.
            status = _with_status(printable(status))
        await super().push(status)

    # --- commands -----------------------------------------------------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._refuse_helo(hostname):
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._refuse_helo(hostname):
            await super().smtp_EHLO(hostname)

    async def _refuse_helo(self, hostname: str | None) -> bool:
        """``501`` for a name that could not be logged, traced or stored as text; the session
        keeps its state before the command (a good EHLO may follow)."""
        if not hostname or not _BAD_HELO.search(hostname):
            return False
        self._count_reject("helo", "bad_helo")
        event(log, "reject", "NOQUEUE", stage="helo", client=self.client_ip,
              reason="bad_helo", helo=hostname)  # fmt: skip
        await self.push("501 5.5.2 HELO/EHLO name must be valid UTF-8 without control characters")
        return True

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Nested MAIL command: one transaction at a time")
            return
        try:
            path, rest = split_path(arg[5:])
        except AddressError as exc:
            await self.push(f"501 5.1.7 Bad sender address syntax: {exc}")
            return
        params, problem = self._mail_params(rest)
        if problem is not None:
            await self.push(problem)
            return
        problem = _non_ascii_problem(path, bool(params.get("SMTPUTF8")), "sender")
        if problem is not None:
            await self.push(problem)
            return
        await self.push(
            await self.handler.handle_MAIL(self, self.session, self.envelope, path, params)
        )

    def _mail_params(self, text: str) -> tuple[MailOptions, str | None]:
        params: MailOptions = {}
        if text and not self.session.extended_smtp:
            return params, "555 5.5.4 MAIL FROM parameters need EHLO, not HELO"
        for token in text.split():
            key, eq, value = token.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit():
                params["SIZE"] = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                params["BODY"] = value.upper()
            elif key == "SMTPUTF8" and not eq:
                params["SMTPUTF8"] = True
            else:
                return params, f"555 5.5.4 MAIL FROM parameter not recognised: {token}"
        limit = self.config.gateway.max_message_size
        if int(params.get("SIZE", 0)) > limit:
            self._count_reject("mail", "size")
            event(log, "reject", "NOQUEUE", stage="mail", client=self.client_ip,
                  reason="size", declared=params["SIZE"], limit=limit)  # fmt: skip
            return params, f"552 5.3.4 Message size exceeds the fixed limit of {limit} bytes"
        return params, None

    @syntax("RCPT TO: <address>")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        if envelope.mail_from is None:
            await self.push("503 5.5.1 Need MAIL FROM first")
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            path, rest = split_path(arg[3:])
        except AddressError as exc:
            await self.push(f"501 5.1.3 Bad recipient address syntax: {exc}")
            return
        if rest:
            await self.push(f"555 5.5.4 RCPT TO parameters not recognised: {rest}")
            return
        problem = _non_ascii_problem(path, envelope.smtp_utf8, "recipient")
        if problem is not None:
            await self.push(problem)
            return
        if path in envelope.rcpt_tos:
            await self.push("250 2.1.5 Recipient ok (duplicate)")
            return
        await self.push(await self.handler.handle_RCPT(self, self.session, envelope, path, []))

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        if envelope.mail_from is None:
            await self.push("503 5.5.1 Need MAIL FROM first")
            return
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT TO first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA (no arguments)")
            return
        self.busy = True
        reservation = self.intake.data_budget.reservation()
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._reset_timeout(self.config.gateway.data_timeout)
            pieces, problem = await self._read_data(reservation)
            self._reset_timeout()
            reply = problem or await self._message(envelope, pieces)
            del pieces
            reservation.release()  # the message is queued or refused: its bytes are gone
            self._set_post_data_state()
            self.junk = 0 if reply.startswith("250") else self.junk  # mail flows: not junk
            await self.push(reply)
        finally:
            reservation.release()  # also on a disconnect, a timeout or a cancelled session
            self.busy = False
        if self.intake.stopping:
            self.close_with("421 4.3.2 Service shutting down, try again later")

    # --- DATA ---------------------------------------------------------------------------

    async def _read_data(self, reservation: Reservation) -> tuple[list[bytes], str | None]:
        """Read up to ``<CRLF>.<CRLF>``; the pieces (dot-unstuffed) or a refusal.

        Only a line that is exactly ``.`` between two CRLFs ends the data; the reader is left
        right after it (pipelined commands stay for the command loop).  The reader's buffer
        stays bounded (``DATA_CHUNK``): when it is full the transport pauses, which is how a
        session waiting for the memory budget (``reservation``) stops its client."""
        gateway = self.config.gateway
        data = DataPieces(gateway.max_line_length)
        self._tail = b"\r\n"  # the DATA command line ended a line
        deadline = asyncio.get_running_loop().time() + gateway.data_timeout
        starved = False
        reader = self._reader
        reader._limit = DATA_CHUNK  # type: ignore[attr-defined]  # _limit: 3.7 to 3.13
        declared = min(self.envelope.declared_size, gateway.max_message_size)
        if declared and not await self._reserve(reservation, declared, deadline, prepay=True):
            starved = True
            data.drop()
        try:
            while True:
                piece, last = await self.piece_in_time(self._next_piece(reader))
                if data.keep and data.size + len(piece) > gateway.max_message_size:
                    data.drop()  # too large for sure: keep nothing, read on to the end
                    reservation.release()
                elif data.keep and not await self._reserve(reservation, len(piece), deadline):
                    starved = True
                    data.drop()
                    reservation.release()
                data.add(piece)
                if last:
                    break
        finally:
            reader._limit = COMMAND_BUFFER  # type: ignore[attr-defined]
        return data.pieces, self._data_problem(data, starved)

    async def _next_piece(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """The next raw piece of DATA (up to about ``3 * DATA_CHUNK`` bytes, never ending
        between a CR and its LF), and whether it is the last (the end line taken off).

        Lines ending in "." come one ``readuntil`` each; they are gathered up to DATA_CHUNK
        so that the checks and the budget run once per piece, not once per such line."""
        batch: list[bytes] = []
        size = 0
        tail = self._tail
        last = False
        while size < DATA_CHUNK:
            try:
                piece = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                cut = exc.consumed
                if cut > 1 and reader._buffer[cut - 1] == 13:  # type: ignore[attr-defined]
                    cut -= 1  # leave the CR with its LF: the checks see every CRLF whole
                piece = await reader.readexactly(cut)
                batch.append(piece)
                tail = _last_two(tail, piece)
                break
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("connection closed during DATA") from exc
            before = piece[:-3]
            if _last_two(tail, before) == b"\r\n":  # "." alone on its line: the end
                batch.append(before)
                tail, last = b"\r\n", True
                break
            batch.append(piece)
            size += len(piece)
            tail = piece[-2:]
        self._tail = tail
        return (batch[0] if len(batch) == 1 else b"".join(batch)), last

    async def _reserve(
        self, reservation: Reservation, size: int, deadline: float, prepay: bool = False
    ) -> bool:
        """Take ``size`` bytes of the memory budget, waiting (reading nothing, so TCP holds the
        client back) at most until the DATA timeout; False if it never came."""
        if not prepay and reservation.take_now(size):
            return True
        loop = asyncio.get_running_loop()
        wait = deadline - loop.time()
        self._reset_timeout(wait + 5)  # the wait ends first and answers 452, not 421
        take = reservation.prepay if prepay else reservation.take
        taken = await take(size, wait)
        # Starved: the client may still have much to send before it reads our 452.
        self._reset_timeout(deadline - loop.time() if taken else self.config.gateway.data_timeout)
        return taken

    def _data_problem(self, data: DataPieces, starved: bool) -> str | None:
        gateway = self.config.gateway
        if data.size > gateway.max_message_size:
            limit = gateway.max_message_size
            reply = f"552 5.3.4 Message size exceeds the fixed limit of {limit} bytes"
            return self._refuse_data("size", reply, size=data.size)
        if starved:
            reply = "452 4.3.1 Insufficient system storage, try again later"
            return self._refuse_data("memory", reply, size=data.size)
        if data.bare_line_ending:
            reply = "550 5.6.11 Message refused: bare CR or LF found, lines must end with CRLF"
            return self._refuse_data("bare_line_ending", reply)
        if data.has_nul:
            reply = "554 5.6.0 Message refused: NUL characters are not allowed (RFC 5322)"
            return self._refuse_data("nul", reply)
        if data.longest > gateway.max_line_length:
            reply = f"550 5.6.0 Message has a line longer than {gateway.max_line_length} characters"
            return self._refuse_data("line_length", reply)
        if data.hops() >= MAX_HOPS:
            reply = f"554 5.4.6 Too many hops ({MAX_HOPS} Received: headers): mail loop?"
            return self._refuse_data("mail_loop", reply)
        return None

    def _refuse_data(self, reason: str, reply: str, **fields: Any) -> str:
        self._count_reject("data", reason)
        sender = self.envelope.mail_from
        event(log, "reject", "NOQUEUE", stage="data", client=self.client_ip,
              sender=f"<{sender}>" if sender is not None else "", reason=reason, reply=reply,
              **fields)  # fmt: skip
        return reply

    def _count_reject(self, stage: str, reason: str) -> None:
        self.intake.metrics.inc("rejected", stage=stage, reason=reason)

    async def _message(self, envelope: Transaction, pieces: list[bytes]) -> str:
        """The handler's reply for a message that passed the protocol's checks."""
        envelope.pieces = pieces  # the handler joins them once, behind its Received: header
        return await self.handler.handle_DATA(self, self.session, envelope)


def _non_ascii_problem(path: str, smtputf8: bool, which: str) -> str | None:
    """Non-ASCII addresses need SMTPUTF8 (RFC 6531) and must be valid UTF-8."""
    if path.isascii():
        return None
    if not smtputf8:
        return f"553 5.6.7 Non-ASCII {which} address needs MAIL FROM ... SMTPUTF8"
    try:
        path.encode("utf-8")  # aiosmtpd decoded with surrogateescape: bad bytes stay surrogates
    except UnicodeEncodeError:
        return f"553 5.6.7 The {which} address is not valid UTF-8"
    return None


def _last_two(tail: bytes, piece: bytes) -> bytes:
    """The last two bytes of the stream after ``piece`` (``tail``: the two before it)."""
    return piece[-2:] if len(piece) >= 2 else (tail + piece)[-2:]
