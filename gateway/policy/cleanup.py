"""Cleanup: what turns a message the chain let through into a queued one (as Postfix's cleanup).

The intake's DATA hook (``gateway.intake.handler``) calls :meth:`Cleanup.enqueue` after the
DATA stage accepted, rerouted or held the message; the ``250`` goes out only after it returned
(the message is durable).  The Received: header is not added here: the intake writes it before
the DATA stage, so the scanners see the message as it will be queued.

On accept, reroute or hold the message's bytes are prepared once, in this order:

1. header fields the chain asked to remove go, and the verdict header always goes: a copy that
   came in (from a customer, or the trusted copy on the bad gateway) never leaves the fleet;
2. header fields the chain asked to add come; a good gateway rerouting spam adds its own
   verdict header (``routing.verdict_header``) for the bad gateway;
3. a good gateway DKIM-signs for the From: domain, before routing, so mail carries the
   signature whichever gateway delivers it.  The bad gateway never signs.

After a reject, the side effects the rules asked for run: for a virus, the sender gets an
information NDR (``dsn.make_info_ndr``), queued like any other message; never to ``<>``, and
only when the sender's domain resolves to the client's network (``notice.sender_check``: virus
mail mostly has a forged sender, and a notice to it is backscatter).  It quotes at most 16 KiB
of the original's header fields, and none when clamd flags them (``notice.quotable_headers``).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from gateway import dsn
from gateway.dkim import DkimSigner
from gateway.dns import Resolver
from gateway.policy import headers, notice
from gateway.policy.chain import Action, Decision, MessageContext
from gateway.policy.rules.verdict import format_verdict
from gateway.queue.model import HoldReason, MessageKind, MessageState, Route
from gateway.queue.spool import Spool
from gateway.services import Services

log = logging.getLogger("smg.pipeline")  # the logger name operators filter on: kept

_QUEUED = {Action.ACCEPT, Action.REROUTE, Action.HOLD}
_QUEUE_ROUTE = {Action.REROUTE: Route.BAD_GATEWAY}


class Queued(NamedTuple):
    queue_id: str
    size: int  # bytes queued, after the headers changed and the signatures were added


class Cleanup:
    def __init__(self, services: Services) -> None:
        """A good gateway signs with ``services.dkim`` (``build_services`` loads the keys);
        the bad gateway never signs."""
        self.services = services
        config = services.config
        self.role = config.gateway.role
        self.hostname = config.gateway.hostname
        self.verdict_header = config.routing.verdict_header
        self.client_networks = config.gateway.client_networks
        self.signer = services.dkim if self.role == "good" else None
        self.tenant_signers = services.tenant_dkim or {}
        self.tenanted = bool(config.tenants)

    def _signer(self, ctx: MessageContext) -> DkimSigner | None:
        """A customer's mail is signed with its own keys only: never with another customer's
        or the fleet's ``[dkim]`` keys (issue 11)."""
        if self.tenanted and ctx.tenant:
            return self.tenant_signers.get(ctx.tenant)
        return self.signer

    async def enqueue(self, ctx: MessageContext, decision: Decision) -> Queued:
        """Prepare and queue an accepted, rerouted or held message; sets ``ctx.queue_id``.
        Spool errors propagate: the intake turns them into its 4xx reply."""
        prepared = await self.prepare(ctx, decision)
        # Spam of a suspended customer: held, on its way to the bad gateway once released.
        held = decision.action == Action.HOLD or bool(ctx.facts.get("suspended"))
        queue_id = await self._spool().enqueue(
            ctx.mail_from,
            ctx.rcpt_tos,
            prepared,
            route=_QUEUE_ROUTE.get(decision.action, Route.DIRECT),
            state=MessageState.HELD if held else MessageState.ACTIVE,
            hold_reason=HoldReason.SUSPENDED if ctx.facts.get("suspended") else None,
            client_ip=ctx.client_ip,
            helo=ctx.helo,
            facts=ctx.facts,
            tenant=ctx.tenant,
        )
        ctx.queue_id = queue_id
        return Queued(queue_id, len(prepared))

    def _spool(self) -> Spool:
        if self.services.spool is None:  # smg explain: nothing may be queued
            raise RuntimeError("no spool: a dry run queues nothing")
        return self.services.spool

    async def prepare(self, ctx: MessageContext, decision: Decision) -> bytes:
        """The bytes to queue for an accepted, rerouted or held message.

        Only the header block changes: it is worked on alone and the body is copied once, in
        the final join (before, each step copied the whole message)."""
        data = ctx.data
        cut = headers.header_end(data)
        head = data[:cut]
        new_head = headers.remove(head, {*ctx.remove_headers, self.verdict_header.lower()})
        new_fields = list(ctx.add_headers)
        if self.role == "good" and decision.action == Action.REROUTE:
            verdict = ctx.facts.get("spam")
            if verdict:
                value = format_verdict(verdict, self.hostname, ctx.tenant)
                new_fields.append((self.verdict_header, value))
        if new_fields:
            new_head = headers.prepend(new_head, new_fields, headers.line_end(data))
        signatures = b""
        signer = self._signer(ctx) if self.role == "good" else None
        if signer is not None and decision.action in _QUEUED:
            signatures = signer.header_signatures(new_head, data, cut)
        if new_head is head and not signatures:
            return data  # nothing changed: no copy at all
        return b"".join((signatures, new_head, memoryview(data)[cut:]))

    def signing_keys(self, ctx: MessageContext) -> list[str]:
        """Which keys would sign this message here (for ``smg explain``)."""
        signer = self._signer(ctx) if self.role == "good" else None
        if signer is None:
            return []
        return [key.describe() for key in signer.keys_for(ctx.data)]

    async def after_reject(self, ctx: MessageContext, decision: Decision) -> None:
        """Side effects of a rejection: the information NDR for a virus.  Never raises: the
        client gets its 554 whatever happens here."""
        virus = ctx.facts.get("virus")
        if decision.action != Action.REJECT or not virus:
            return
        if not ctx.mail_from:
            log.info("virus %s from the null sender: no information NDR", virus)
            return
        try:
            check = await self.notice_check(ctx)
            if not check.allowed:
                log.info("virus %s from <%s>: no information NDR: %s",
                         virus, ctx.mail_from, check.reason)  # fmt: skip
                return
            quoted = await notice.quotable_headers(self.services.clamd, ctx.data, virus)
            ndr = dsn.make_info_ndr(
                hostname=self.hostname,
                sender=ctx.mail_from,
                recipients=ctx.rcpt_tos,
                virus=virus,
                original=quoted,
                queue_id=ctx.queue_id or None,
                client_ip=ctx.client_ip,
            )
            queue_id = await self._spool().enqueue(
                "", [ctx.mail_from], ndr, kind=MessageKind.NDR, facts={"virus": virus}
            )
        except Exception:
            log.exception("information NDR for virus %s to %s not queued", virus, ctx.mail_from)
            return
        log.info("information NDR %s queued to %s for virus %s (%s)",
                 queue_id, ctx.mail_from, virus, check.reason)  # fmt: skip

    async def notice_check(self, ctx: MessageContext) -> notice.NoticeCheck:
        """May the virus notice go to ``ctx.mail_from`` (also for ``smg explain``)?"""
        return await notice.sender_check(
            self._resolver(), ctx.mail_from, ctx.client_ip, self.client_networks
        )

    def _resolver(self) -> Resolver:
        if self.services.resolver is None:
            self.services.resolver = Resolver(self.services.config.dns)
        return self.services.resolver
