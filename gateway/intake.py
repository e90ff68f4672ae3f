"""The SMTP intake: aiosmtpd speaking to customers' MTAs, protocol rules only.

At each stage it asks the policy chain (``gateway.policy``) and turns the decision into the
reply; nothing is written to the spool before the whole message passed the chain, and the
``250`` goes out only after ``spool.enqueue`` returned (the message is durable).

Protocol rules enforced here (each refusal is a clear reply and the session goes on, except
where it says "close"):

- relay control at connect: a client outside ``gateway.client_networks`` gets
  ``554 5.7.1`` instead of the greeting (close);  more than ``gateway.max_connections``
  sessions: ``421 4.7.0`` (close);
- ``idle_timeout`` between commands and ``data_timeout`` for the whole DATA phase:
  ``421 4.4.2`` (close);
- SIZE is advertised; ``552 5.3.4`` for a ``SIZE=`` above ``max_message_size`` and for a
  message that turns out larger (it is read to its end and dropped);
- strict line endings in DATA: only ``<CRLF>.<CRLF>`` ends the data.  A message containing a
  bare CR or a bare LF anywhere is refused with ``550 5.6.11`` - never "normalised" - so no
  ``<LF>.<LF>``, ``<LF>.<CRLF>`` or ``<CR>.<CR>`` trick can end the data early here or at any
  server downstream, and no second message can be smuggled in;
- lines longer than ``max_line_length``: ``550 5.6.0`` for message lines (RFC 5322 2.1.1),
  ``500 5.5.2`` for command lines (RFC 5321 4.5.3.1.4);
- SMTPUTF8 and 8BITMIME are advertised; a non-ASCII address without ``SMTPUTF8`` on MAIL FROM
  gets ``553 5.6.7``;
- PIPELINING and ENHANCEDSTATUSCODES are advertised; AUTH is not offered (relay control is by
  network); STARTTLS (TLS 1.2 or newer) when ``gateway.tls_cert``/``tls_key`` are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

from gateway.addresses import AddressError, split_path
from gateway.config import Config
from gateway.log import event
from gateway.metrics import Metrics
from gateway.policy.chain import Action, Chain, Decision, MessageContext, Reply, Stage
from gateway.policy.rules.relay_control import client_allowed, relay_denied
from gateway.queue.model import MessageState, Route
from gateway.services import Services

log = logging.getLogger("smg.intake")

COMMAND_BUFFER = 8192  # bytes a command line may fill the reader's buffer with
MAX_HOPS = 50  # Received: headers before we call it a mail loop (Postfix's hopcount_limit)
IDENT = "ESMTP Secure Mail Gateway"

_REFUSING = {Action.REJECT, Action.TEMPFAIL}
_QUEUE_ROUTE = {Action.REROUTE: Route.BAD_GATEWAY}


@dataclass(frozen=True)
class Runtime:
    """What a session works with; a reload (SIGHUP) swaps it for sessions that start later."""

    config: Config
    chain: Chain
    pipeline: Any  # gateway.policy.pipeline.MessagePipeline
    tls_context: ssl.SSLContext | None = None


def make_tls_context(config: Config) -> ssl.SSLContext | None:
    """The server-side context for STARTTLS, or None without ``gateway.tls_cert``."""
    gateway = config.gateway
    if gateway.tls_cert is None or gateway.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(gateway.tls_cert), str(gateway.tls_key))
    return context


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


class Intake:
    """The listeners and the sessions; :meth:`reload` swaps the runtime for new sessions."""

    def __init__(self, services: Services, runtime: Runtime) -> None:
        self.services = services
        self.runtime = runtime
        self.metrics: Metrics = services.metrics or Metrics()
        self.sessions: set[GatewaySMTP] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.runtime.config.gateway.listen:
            server = await loop.create_server(
                self._new_session, host, port, reuse_address=True,
                reuse_port=self.runtime.config.gateway.workers > 1,  # gateway/workers.py
            )  # fmt: skip
            self.servers.append(server)
            event(log, "listening", address=f"{host}:{port}")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the listeners are bound (port 0 in the config: the port picked)."""
        return [sock.getsockname()[:2] for s in self.servers for sock in s.sockets]

    def reload(self, runtime: Runtime) -> None:
        old = self.runtime.config.gateway.listen
        if runtime.config.gateway.listen != old:
            log.warning("gateway.listen changed: takes effect at the next restart, not on reload")
        self.runtime = runtime

    def _new_session(self) -> GatewaySMTP:
        return GatewaySMTP(self, self.runtime)

    def admit(self, session: GatewaySMTP, client_ip: str) -> Reply | None:
        """Relay control and the connection cap, when a client connects."""
        config = self.runtime.config.gateway
        if self.stopping:
            return Reply(421, "4.3.2", f"{config.hostname} Service shutting down, try again later")
        if not client_allowed(client_ip, config.client_networks):
            self.metrics.inc("connections_refused", reason="relay_control")
            event(log, "reject", "NOQUEUE", stage="connect", client=client_ip,
                  reason="relay_control", reply="554 5.7.1 Relay access denied")  # fmt: skip
            return relay_denied(client_ip)
        if len(self.sessions) >= config.max_connections:
            self.metrics.inc("connections_refused", reason="max_connections")
            event(log, "reject", "NOQUEUE", stage="connect", client=client_ip,
                  reason="max_connections", limit=config.max_connections)  # fmt: skip
            return Reply(421, "4.7.0", f"{config.hostname} Too many connections, try again later")
        self.sessions.add(session)
        self._idle.clear()
        self.metrics.inc("connections")
        return None

    def session_ended(self, session: GatewaySMTP) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let transactions in flight finish (at most ``grace`` seconds),
        then close every session with ``421``."""
        self.stopping = True
        for server in self.servers:
            server.close()
        for session in list(self.sessions):
            if not session.busy:
                session.close_with("421 4.3.2 Service shutting down, try again later")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        for session in list(self.sessions):
            session.close_with("421 4.3.2 Service shutting down, try again later")
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.servers.clear()


class _Hooks:
    """aiosmtpd handler: the EHLO capabilities, and a 4xx for our own bugs."""

    async def handle_exception(self, error: Exception) -> str:
        # A bug in a command handler: the client retries later instead of seeing a 500
        # with a Python exception text.
        if isinstance(error, TLSSetupException):  # a client that cannot do TLS 1.2+
            log.warning("STARTTLS handshake failed: %s", error.__cause__ or error)
            return "454 4.7.0 TLS handshake failed"
        log.error("SMTP session error", exc_info=error)
        return "451 4.3.0 Local error, try again later"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, name: str, lines: list[str]
    ) -> list[str]:
        session.host_name = name
        keep = [line for line in lines[:-1] if not line.startswith("250-AUTH")]
        return [*keep, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]


class GatewaySMTP(SMTP):
    """One SMTP session.  MAIL, RCPT and DATA are ours; aiosmtpd does the rest."""

    def __init__(self, intake: Intake, runtime: Runtime) -> None:
        gateway = runtime.config.gateway
        self.intake = intake
        self.runtime = runtime
        self.ctx: MessageContext | None = None
        self.busy = False
        self.client_ip = ""
        self._admitted = False
        self._refused = False
        # The reader's buffer limit while reading commands: a client cannot make a session
        # buffer more than this without a line end (aiosmtpd answers 500 and reads on).
        # DATA raises it to the message size for its reads (see _read_data).
        self.line_length_limit = COMMAND_BUFFER
        super().__init__(
            _Hooks(),
            data_size_limit=gateway.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=gateway.hostname,
            ident=IDENT,
            tls_context=runtime.tls_context,
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
            event(log, "connect", client=self.client_ip)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._admitted:
            self._admitted = False
            self.intake.session_ended(self)
            event(log, "disconnect", client=self.client_ip)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def _timeout_cb(self) -> None:
        self.close_with(f"421 4.4.2 {self.hostname} Timeout, closing the connection")

    def close_with(self, reply: str) -> None:
        """Say ``reply`` and close (timeouts, shutdown)."""
        if self.transport is None:
            return
        with contextlib.suppress(Exception):
            self._writer.write(reply.encode() + b"\r\n")
        self.transport.close()

    def _set_rset_state(self) -> None:
        super()._set_rset_state()
        self.ctx = None

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _with_status(status)
        await super().push(status)

    # --- commands -----------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH is not offered here: relay access is by client address")

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        if self.ctx is not None:
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
        ctx = MessageContext(
            client_ip=self.client_ip,
            helo=self.session.host_name or "",
            mail_from=path,
            tls=self.session.ssl is not None,
        )
        if params.get("SMTPUTF8"):
            ctx.facts["smtputf8"] = True
        if params.get("BODY"):
            ctx.facts["body"] = params["BODY"]
        refusal = await self._run_stage(Stage.MAIL, ctx)
        if refusal is not None:
            await self.push(refusal)
            return
        self.ctx = ctx
        await self.push("250 2.1.0 Sender ok")

    def _mail_params(self, text: str) -> tuple[dict[str, Any], str | None]:
        params: dict[str, Any] = {}
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
        limit = self.runtime.config.gateway.max_message_size
        if params.get("SIZE", 0) > limit:
            self._count_reject("mail", "size")
            event(log, "reject", "NOQUEUE", stage="mail", client=self.client_ip,
                  reason="size", declared=params["SIZE"], limit=limit)  # fmt: skip
            return params, f"552 5.3.4 Message size exceeds the fixed limit of {limit} bytes"
        return params, None

    @syntax("RCPT TO: <address>")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        ctx = self.ctx
        if ctx is None:
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
        problem = _non_ascii_problem(path, bool(ctx.facts.get("smtputf8")), "recipient")
        if problem is not None:
            await self.push(problem)
            return
        if path in ctx.rcpt_tos:
            await self.push("250 2.1.5 Recipient ok (duplicate)")
            return
        ctx.rcpt_tos.append(path)
        refusal = await self._run_stage(Stage.RCPT, ctx)
        if refusal is not None:
            ctx.rcpt_tos.pop()
            await self.push(refusal)
            return
        await self.push("250 2.1.5 Recipient ok")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        ctx = self.ctx
        if ctx is None:
            await self.push("503 5.5.1 Need MAIL FROM first")
            return
        if not ctx.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT TO first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA (no arguments)")
            return
        self.busy = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._reset_timeout(self.runtime.config.gateway.data_timeout)
            data, problem = await self._read_data()
            self._reset_timeout()
            reply = problem or await self._message(ctx, data)
            self.ctx = None
            await self.push(reply)
        finally:
            self.busy = False
        if self.intake.stopping:
            self.close_with("421 4.3.2 Service shutting down, try again later")

    # --- DATA ---------------------------------------------------------------------------

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read up to ``<CRLF>.<CRLF>``; the bytes (dot-unstuffed) or a refusal.

        Only a line that is exactly ``.`` between two CRLFs ends the data; the reader is left
        right after it (pipelined commands stay for the command loop)."""
        limit = self.runtime.config.gateway.max_message_size
        chunks: list[bytes] = []
        size = 0
        tail = b"\r\n"  # the DATA command line ended a line
        reader = self._reader
        # One readuntil() per ".<CRLF>" instead of one per line: the buffer may hold a whole
        # message now.  asyncio.StreamReader keeps its limit in _limit (3.7 to 3.13).
        reader._limit = limit + 4096  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    piece = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    piece = await reader.readexactly(exc.consumed)
                    size += len(piece)
                    chunks.clear()  # too large for sure: keep nothing, read on to the end
                    tail = _last_two(tail, piece)
                    continue
                except asyncio.IncompleteReadError as exc:
                    raise ConnectionResetError("connection closed during DATA") from exc
                before = piece[:-3]
                if _last_two(tail, before) == b"\r\n":  # "." alone on its line: the end
                    size += len(before)
                    if size <= limit:
                        chunks.append(before)
                    break
                size += len(piece)
                if size <= limit:
                    chunks.append(piece)
                tail = piece[-2:]
        finally:
            reader._limit = COMMAND_BUFFER  # type: ignore[attr-defined]
        if size > limit:
            reply = f"552 5.3.4 Message size exceeds the fixed limit of {limit} bytes"
            return b"", self._refuse_data("size", reply, size=size)
        data = b"".join(chunks)
        return data, self._data_problem(data)

    def _data_problem(self, data: bytes) -> str | None:
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            reply = "550 5.6.11 Message refused: bare CR or LF found, lines must end with CRLF"
            return self._refuse_data("bare_line_ending", reply)
        return None

    def _refuse_data(self, reason: str, reply: str, **fields: Any) -> str:
        self._count_reject("data", reason)
        ctx = self.ctx
        event(log, "reject", "NOQUEUE", stage="data", client=self.client_ip,
              sender=f"<{ctx.mail_from}>" if ctx else "", reason=reason, reply=reply,
              **fields)  # fmt: skip
        return reply

    async def _message(self, ctx: MessageContext, raw: bytes) -> str:
        """Unstuff, trace, run the DATA stage, queue: the final reply."""
        data = raw[1:] if raw.startswith(b".") else raw
        data = data.replace(b"\r\n.", b"\r\n")
        max_line = self.runtime.config.gateway.max_line_length
        if len(data) > max_line and max(map(len, data.split(b"\r\n"))) > max_line:
            reply = f"550 5.6.0 Message has a line longer than {max_line} characters"
            return self._refuse_data("line_length", reply)
        if _hops(data) >= MAX_HOPS:
            reply = f"554 5.4.6 Too many hops ({MAX_HOPS} Received: headers): mail loop?"
            return self._refuse_data("mail_loop", reply)
        ctx.data = self._received_header(ctx) + data
        refusal = await self._run_stage(Stage.DATA, ctx)
        if refusal is not None:
            return refusal
        decision = self._last_decision
        try:
            prepared = await self.runtime.pipeline.prepare(ctx, decision)
            queue_id = await self.intake.services.spool.enqueue(
                ctx.mail_from,
                ctx.rcpt_tos,
                prepared,
                route=_QUEUE_ROUTE.get(decision.action, Route.DIRECT),
                state=MessageState.HELD if decision.action == Action.HOLD else MessageState.ACTIVE,
                client_ip=ctx.client_ip,
                helo=ctx.helo,
                facts=ctx.facts,
            )
        except Exception as exc:
            return self._queue_failure(ctx, exc)
        ctx.queue_id = queue_id
        self.intake.metrics.inc("received")
        event(log, "received", queue_id, client=ctx.client_ip, helo=ctx.helo,
              sender=f"<{ctx.mail_from}>", nrcpt=len(ctx.rcpt_tos), size=len(prepared),
              action=str(decision.action), decided_by=decision.decided_by,
              tls=ctx.tls)  # fmt: skip
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _queue_failure(self, ctx: MessageContext, exc: Exception) -> str:
        from gateway.queue.spool import SpoolFull, SpoolUnavailable  # optional in unit tests

        self._count_reject("data", "spool")
        if isinstance(exc, SpoolUnavailable):
            event(log, "tempfail", "NOQUEUE", level=logging.ERROR, client=ctx.client_ip,
                  sender=f"<{ctx.mail_from}>", reason="spool", error=str(exc))  # fmt: skip
            if isinstance(exc, SpoolFull):
                return "452 4.3.1 Insufficient system storage, try again later"
            return "451 4.3.0 Queue temporarily unavailable, try again later"
        log.exception("queueing a message from %s failed", ctx.client_ip)
        return "451 4.3.0 Local error while queueing, try again later"

    def _received_header(self, ctx: MessageContext) -> bytes:
        protocol = "UTF8SMTP" if ctx.facts.get("smtputf8") else "ESMTP"
        if not self.session.extended_smtp:
            protocol = "SMTP"
        if ctx.tls:
            protocol += "S"
        helo = _header_safe(ctx.helo) or "unknown"
        for_clause = (
            f"\r\n\tfor <{_header_safe(ctx.rcpt_tos[0])}>" if len(ctx.rcpt_tos) == 1 else ""
        )
        date = email.utils.format_datetime(email.utils.localtime())
        text = (
            f"Received: from {helo} ([{ctx.client_ip}])\r\n\tby {self.hostname} (smg) "
            f"with {protocol}{for_clause};\r\n\t{date}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")

    # --- the policy chain ---------------------------------------------------------------

    _last_decision: Decision

    async def _run_stage(self, stage: Stage, ctx: MessageContext) -> str | None:
        """Run ``stage``; the refusal reply, or None to go on (the decision is kept)."""
        chain: Chain = self.runtime.chain
        try:
            decision = await chain.run(stage, ctx)
        except Exception:
            log.exception("policy %s stage failed for %s", stage, ctx.client_ip)
            self._count_reject(str(stage), "policy_error")
            return "451 4.3.0 Temporary failure in a policy check, try again later"
        self._last_decision = decision
        if decision.action not in _REFUSING:
            return None
        reply = decision.reply or (
            Reply(550, "5.7.1", "Message refused by policy")
            if decision.action == Action.REJECT
            else Reply(451, "4.7.1", "Temporary policy failure, try again later")
        )
        self._count_reject(str(stage), decision.decided_by or "policy")
        where = {"rcpt": f"<{ctx.rcpt_tos[-1]}>"} if stage == Stage.RCPT else {}
        event(log, "reject", "NOQUEUE", stage=str(stage), client=ctx.client_ip,
              sender=f"<{ctx.mail_from}>", **where, reason=decision.decided_by,
              reply=str(reply))  # fmt: skip
        if stage == Stage.DATA:
            try:
                await self.runtime.pipeline.after_reject(ctx, decision)
            except Exception:
                log.exception("after_reject failed for %s", ctx.client_ip)
        return str(reply)

    def _count_reject(self, stage: str, reason: str) -> None:
        self.intake.metrics.inc("rejected", stage=stage, reason=reason)


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


def _hops(data: bytes) -> int:
    header_end = data.find(b"\r\n\r\n")
    head = data if header_end < 0 else data[: header_end + 2]
    return len(re.findall(rb"(?im)^received:", head))


def _header_safe(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:255]
