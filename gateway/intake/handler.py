"""The intake's policy side: aiosmtpd handler hooks that run the policy chain.

The protocol (``gateway.intake.protocol``) parses and checks the commands, then calls a hook
of the same shape as aiosmtpd's (``handle_MAIL(server, session, envelope, address, options)``
and so on) and pushes the reply string the hook returns.  The hooks run the chain's stage,
log and count refusals, and on a message the chain let through hand it to the cleanup step
(``gateway.policy.cleanup``), which queues it.

Relay control is checked once, when a client connects (:meth:`PolicyHandler.identify`): the
relay's chain is built without the ``relay_control`` rule.  With ``[[tenants]]`` the client is
the customer whose network holds its address (longest prefix), or a client of
``gateway.auth_networks`` (or loopback in ``client_networks``) that must log in as a customer's
user before MAIL (``530 5.7.0``); anyone else gets ``554 5.7.1``.  The customer's name goes on
every log line and into the queue (``tenant``).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import re
from collections.abc import Iterable

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from gateway.dns import unmapped
from gateway.intake.tenant_limits import TenantGuard
from gateway.log import event
from gateway.metrics import Metrics
from gateway.policy.chain import Action, Chain, Decision, MessageContext, Reply, Stage
from gateway.policy.cleanup import Cleanup
from gateway.policy.rules.relay_control import auth_required, client_allowed, relay_denied
from gateway.queue.errors import SpoolFull, SpoolUnavailable
from gateway.tenants import Tenant, TenantTable

log = logging.getLogger("smg.intake")

_REFUSING = {Action.REJECT, Action.TEMPFAIL}
MailOptions = dict[str, int | str | bool]  # SIZE, BODY, SMTPUTF8 as the protocol parsed them
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Transaction(Envelope):
    """aiosmtpd's envelope, plus the policy's view of the message between MAIL and DATA."""

    def __init__(self) -> None:
        super().__init__()
        self.context: MessageContext | None = None
        self.pieces: list[bytes] = []  # the message read by the protocol, dot-unstuffed
        self.declared_size = 0  # MAIL FROM's SIZE= (0: none): DATA reserves it at once


class PolicyHandler:
    """The hooks for the sessions of one runtime (a reload makes a new handler)."""

    def __init__(
        self,
        chain: Chain,
        cleanup: Cleanup,
        client_networks: Iterable[Network],
        metrics: Metrics,
        tenants: TenantTable | None = None,
    ) -> None:
        self.chain = chain
        self.cleanup = cleanup
        self.client_networks = list(client_networks)
        self.metrics = metrics
        self.tenants = tenants if tenants is not None else TenantTable(())
        self.offers_auth = any(t.users for t in self.tenants.tenants.values())
        self.guard: TenantGuard | None = None  # limits and suspension (the Intake sets it)

    # --- aiosmtpd's own hooks -----------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        # A bug in a command handler: the client retries later instead of seeing a 500
        # with a Python exception text.
        if isinstance(error, TLSSetupException):  # a client that cannot do TLS 1.2+
            log.warning("STARTTLS handshake failed: %s", error.__cause__ or error)
            return "454 4.7.0 TLS handshake failed"
        log.error("SMTP session error", exc_info=error)
        return "451 4.3.0 Local error, try again later"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, name: str, lines: list[str]
    ) -> list[str]:
        session.host_name = name
        keep = [line for line in lines[:-1]
                if self.offers_auth or not line.startswith("250-AUTH")]  # fmt: skip
        return [*keep, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]

    # --- connect ------------------------------------------------------------------------

    def identify(self, client_ip: str) -> tuple[str | None, Tenant | None]:
        """``(refusal, tenant)`` for a client that connects: who it is, or the ``554``."""
        if not self.tenants:
            return self.check_client(client_ip), None
        tenant = self.tenants.by_address(client_ip)
        if tenant is not None:
            return None, tenant
        if self.tenants.may_authenticate(client_ip) or (
            _is_loopback(client_ip) and client_allowed(client_ip, self.client_networks)
        ):
            return None, None  # must AUTH before MAIL
        return self._refuse_client(client_ip), None

    def check_client(self, client_ip: str) -> str | None:
        """Relay control: a client outside ``gateway.client_networks`` gets ``554 5.7.1``
        instead of the greeting, so a stranger never gets as far as MAIL FROM."""
        if client_allowed(client_ip, self.client_networks):
            return None
        return self._refuse_client(client_ip)

    def _refuse_client(self, client_ip: str) -> str:
        self.metrics.inc("connections_refused", reason="relay_control")
        event(log, "reject", "NOQUEUE", stage="connect", client=client_ip,
              reason="relay_control", reply="554 5.7.1 Relay access denied")  # fmt: skip
        return str(relay_denied(client_ip))

    # --- the transaction ----------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Transaction,
        address: str,
        options: MailOptions,
    ) -> str:
        tenant: Tenant | None = getattr(server, "tenant", None)
        if self.tenants and tenant is None:
            event(log, "reject", "NOQUEUE", stage="mail", client=_client_ip(session),
                  sender=f"<{address}>", reason="auth_required")  # fmt: skip
            self.metrics.inc("rejected", stage="mail", reason="auth_required")
            return str(auth_required())
        ctx = MessageContext(
            client_ip=_client_ip(session),
            helo=session.host_name or "",
            mail_from=address,
            tls=session.ssl is not None,
            rcpt_tos=envelope.rcpt_tos,  # one list: what the envelope accepted, the chain sees
            tenant=tenant.name if tenant is not None else None,
        )
        if tenant is not None and self.guard is not None:
            refusal = self.guard.at_mail(tenant, ctx.client_ip, int(options.get("SIZE", 0)))
            if refusal is not None:
                return refusal
        if options.get("SMTPUTF8"):
            ctx.facts["smtputf8"] = True
        if options.get("BODY"):
            ctx.facts["body"] = options["BODY"]
        decision = await self._run_stage(Stage.MAIL, ctx)
        if isinstance(decision, str):
            return decision
        envelope.mail_from = address
        envelope.smtp_utf8 = bool(options.get("SMTPUTF8"))
        envelope.declared_size = int(options.get("SIZE", 0))
        envelope.context = ctx
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Transaction,
        address: str,
        options: list[str],
    ) -> str:
        ctx = _context(envelope)
        tenant = self._tenant(ctx)
        if tenant is not None and self.guard is not None:
            refusal = self.guard.at_rcpt(tenant, ctx.client_ip, len(ctx.rcpt_tos))
            if refusal is not None:
                return refusal
        ctx.rcpt_tos.append(address)  # the RCPT stage looks at the last recipient
        decision = await self._run_stage(Stage.RCPT, ctx)
        if isinstance(decision, str):
            ctx.rcpt_tos.pop()
            return decision
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Transaction) -> str:
        """``envelope.pieces``: the message, dot-unstuffed and checked by the protocol.
        Trace, run the DATA stage, queue: the final reply."""
        ctx = _context(envelope)
        # One copy of the message: the pieces joined behind the trace header, then let go.
        ctx.data = b"".join([_received_header(server.hostname, session, ctx), *envelope.pieces])
        envelope.pieces.clear()
        tenant = self._tenant(ctx)
        guard = self.guard if tenant is not None else None
        if guard is not None and len(ctx.data) > tenant.limits.max_message_size:  # type: ignore[union-attr]
            return guard.size_reply(tenant)  # type: ignore[arg-type]
        decision = await self._run_stage(Stage.DATA, ctx)
        if isinstance(decision, str):
            return decision
        # Counted and judged before queueing: spam of a customer suspended by now (this very
        # message, another worker, an operator) is queued held, never deferred.
        if guard is not None and await guard.before_queue(tenant, ctx, decision):  # type: ignore[arg-type]
            ctx.facts["suspended"] = True
        try:
            queued = await self.cleanup.enqueue(ctx, decision)
        except Exception as exc:
            return self._queue_failure(ctx, exc)
        self.metrics.inc("received")
        # smg trace reads message_id, to, verdicts and action (docs/monitoring.md).
        event(log, "received", queued.queue_id, client=ctx.client_ip, helo=ctx.helo,
              sender=f"<{ctx.mail_from}>", nrcpt=len(ctx.rcpt_tos), size=queued.size,
              action=str(decision.action), decided_by=decision.decided_by,
              tls=ctx.tls, message_id=message_id(ctx.data or b""),
              to=",".join(f"<{r}>" for r in ctx.rcpt_tos),
              verdicts=verdicts(decision), **_tenant_field(ctx))  # fmt: skip
        return f"250 2.0.0 Ok: queued as {queued.queue_id}"

    def _queue_failure(self, ctx: MessageContext, exc: Exception) -> str:
        self.metrics.inc("rejected", stage="data", reason="spool")
        if isinstance(exc, SpoolUnavailable):
            event(log, "tempfail", "NOQUEUE", level=logging.ERROR, client=ctx.client_ip,
                  sender=f"<{ctx.mail_from}>", reason="spool", error=str(exc),
                  **_tenant_field(ctx))  # fmt: skip
            if isinstance(exc, SpoolFull):
                return "452 4.3.1 Insufficient system storage, try again later"
            return "451 4.3.0 Queue temporarily unavailable, try again later"
        log.exception("queueing a message from %s failed", ctx.client_ip)
        return "451 4.3.0 Local error while queueing, try again later"

    def _tenant(self, ctx: MessageContext) -> Tenant | None:
        return self.tenants.get(ctx.tenant) if ctx.tenant else None

    # --- the policy chain ---------------------------------------------------------------

    async def _run_stage(self, stage: Stage, ctx: MessageContext) -> Decision | str:
        """Run ``stage``: the decision to go on with, or the refusal reply."""
        try:
            decision = await self.chain.run(stage, ctx)
        except Exception:
            log.exception("policy %s stage failed for %s", stage, ctx.client_ip)
            self.metrics.inc("rejected", stage=str(stage), reason="policy_error")
            return "451 4.3.0 Temporary failure in a policy check, try again later"
        if decision.action not in _REFUSING:
            return decision
        reply = decision.reply or (
            Reply(550, "5.7.1", "Message refused by policy")
            if decision.action == Action.REJECT
            else Reply(451, "4.7.1", "Temporary policy failure, try again later")
        )
        self.metrics.inc("rejected", stage=str(stage), reason=decision.decided_by or "policy")
        if decision.action == Action.TEMPFAIL:  # 4xx: a scanner down shows here (alert rules)
            self.metrics.inc("tempfailed", stage=str(stage), reason=decision.decided_by or "policy")
        where = {"rcpt": f"<{ctx.rcpt_tos[-1]}>"} if stage == Stage.RCPT else {}
        event(log, "reject", "NOQUEUE", stage=str(stage), client=ctx.client_ip,
              sender=f"<{ctx.mail_from}>", **where, reason=decision.decided_by,
              reply=str(reply), **_tenant_field(ctx))  # fmt: skip
        tenant = self._tenant(ctx)
        if tenant is not None and self.guard is not None and stage != Stage.RCPT:
            try:  # a rejected message counts in the customer's window
                await self.guard.after_reject(tenant, ctx, decision.decided_by or "policy")
            except Exception:
                log.exception("tenant accounting failed for %s", ctx.client_ip)
        if stage == Stage.DATA:
            try:
                await self.cleanup.after_reject(ctx, decision)
            except Exception:
                log.exception("after_reject failed for %s", ctx.client_ip)
        return str(reply)


_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]{1,250}>)")
_HEADER_SCAN = 65536  # Message-ID is looked for in the header block's first 64 KiB only


def message_id(data: bytes) -> str:
    """The message's Message-ID (``<...>``) for the log, or ``-``."""
    head = data[:_HEADER_SCAN]
    end = head.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(head if end < 0 else head[:end])
    return match[1].decode("utf-8", "replace") if match else "-"


def verdicts(decision: Decision) -> str:
    """What each rule found, ``rule=summary;...`` (the trace shows it as the verdicts)."""
    return ";".join(f"{r.rule}={r.summary}" for r in decision.results if r.summary)


def _tenant_field(ctx: MessageContext) -> dict[str, str]:
    """``tenant=<name>`` on a message's log lines (nothing for an untenanted client)."""
    return {"tenant": ctx.tenant} if ctx.tenant else {}


def _is_loopback(client_ip: str) -> bool:
    try:
        return unmapped(ipaddress.ip_address(client_ip.split("%", 1)[0])).is_loopback
    except ValueError:
        return False


def _context(envelope: Transaction) -> MessageContext:
    # The protocol calls RCPT and DATA hooks only after MAIL was accepted.
    assert envelope.context is not None, "RCPT or DATA before an accepted MAIL"
    return envelope.context


def _client_ip(session: Session) -> str:
    peer = session.peer or ("", 0)
    return str(peer[0])


def _received_header(hostname: str, session: Session, ctx: MessageContext) -> bytes:
    """Our trace header, written before the DATA stage so the scanners see the message as it
    will be queued (as Postfix's smtpd writes it, not its cleanup)."""
    protocol = "UTF8SMTP" if ctx.facts.get("smtputf8") else "ESMTP"
    if not session.extended_smtp:
        protocol = "SMTP"
    if ctx.tls:
        protocol += "S"
    helo = _header_safe(ctx.helo) or "unknown"
    for_clause = f"\r\n\tfor <{_header_safe(ctx.rcpt_tos[0])}>" if len(ctx.rcpt_tos) == 1 else ""
    date = email.utils.format_datetime(email.utils.localtime())
    text = (
        f"Received: from {helo} ([{ctx.client_ip}])\r\n\tby {hostname} (smg) "
        f"with {protocol}{for_clause};\r\n\t{date}\r\n"
    )
    return text.encode("utf-8", "surrogateescape")


def _header_safe(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:255]
