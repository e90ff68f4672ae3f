"""Sender domain check (MAIL stage): the envelope sender's domain must be a public mail domain.

The domain must have an MX record whose host has a public A/AAAA address, or at least a public
A/AAAA record of its own ("public": global unicast, or inside ``dns.extra_public_networks``).
Otherwise ``550 5.1.8 Sender Domain must resolve``: no such domain, no such records, only
private addresses, or a null MX (RFC 7505: the domain says it sends and takes no mail).

DNS trouble is never a reason for a 550: a timeout or SERVFAIL on a lookup the verdict depends
on gives ``451 4.4.3`` and the client tries again later.  The null sender ``<>`` (bounces) has no
domain and is accepted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from gateway.addresses import AddressError, parse_path
from gateway.dns import NXDOMAIN, TEMPFAIL, DnsResult, Resolver
from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage

MAX_MX_HOSTS = 10  # MX hosts looked at, in preference order (a domain needs one public one)


@dataclass
class SenderVerdict:
    """``action`` None: the domain is fine; else REJECT or TEMPFAIL with ``reply``."""

    domain: str
    action: Action | None
    reply: Reply | None
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """For ``smg check-sender``: 0 accept, 1 reject, 2 temporary failure."""
        return {None: 0, Action.REJECT: 1}.get(self.action, 2)


def _reject(domain: str, why: str, details: dict[str, Any]) -> SenderVerdict:
    reply = Reply(550, "5.1.8", f"Sender Domain must resolve ({domain}: {why})")
    return SenderVerdict(domain, Action.REJECT, reply, why, details)


def _tempfail(domain: str, why: str, details: dict[str, Any]) -> SenderVerdict:
    reply = Reply(451, "4.4.3", f"Sender domain {domain} could not be checked ({why}), try later")
    return SenderVerdict(domain, Action.TEMPFAIL, reply, why, details)


def _public(resolver: Resolver, result: DnsResult) -> list[str]:
    return [text for text in result.texts() if resolver.is_public(text)]


async def check_sender_domain(resolver: Resolver, domain: str) -> SenderVerdict:
    """The verdict for one domain (used by the rule and by ``smg check-sender``)."""
    domain = domain.rstrip(".").lower()
    details: dict[str, Any] = {"domain": domain}
    hosts = await resolver.mail_hosts(domain)
    if hosts.status == TEMPFAIL:
        return _tempfail(domain, f"MX lookup: {hosts.rcode}", details)
    if hosts.status == NXDOMAIN:
        return _reject(domain, "no such domain", details)
    if hosts.null_mx:
        return _reject(domain, "null MX, the domain takes no mail (RFC 7505)", details)
    unsure: list[str] = []
    if not hosts.implicit:
        names = hosts.names[:MAX_MX_HOSTS]
        details["mx"] = names
        results = await asyncio.gather(*(resolver.addresses(name) for name in names))
        for name, result in zip(names, results, strict=True):
            public = _public(resolver, result)
            if public:
                details.update(via="mx", host=name, public=public)
                return SenderVerdict(
                    domain, None, None, f"MX {name} has public {public[0]}", details
                )
            if result.status == TEMPFAIL or result.incomplete:
                unsure.append(f"{name}: {result.rcode}")
    own = await resolver.addresses(domain)
    public = _public(resolver, own)
    if public:
        details.update(via="address", public=public)
        return SenderVerdict(domain, None, None, f"{domain} has public {public[0]}", details)
    if own.status == TEMPFAIL or own.incomplete:
        unsure.append(f"{domain}: {own.rcode}")
    if unsure:
        details["tempfail"] = unsure
        return _tempfail(domain, "address lookup: " + ", ".join(unsure), details)
    if own.texts():
        details["not_public"] = own.texts()
        return _reject(domain, "only non-public addresses " + ", ".join(own.texts()), details)
    if "mx" in details:
        return _reject(domain, "no MX host with a public address and no A/AAAA record", details)
    return _reject(domain, "no MX and no A/AAAA record", details)


class SenderDomainRule:
    name = "sender_domain"
    stage = Stage.MAIL

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        if ctx.mail_from == "":
            return RuleResult(self.name, "null sender <>: nothing to check")
        try:
            mailbox = parse_path(ctx.mail_from)
        except AddressError as exc:
            return self._syntax(f"Bad sender address syntax: {exc}")
        if mailbox.route:
            return self._syntax("Source routes are not accepted in MAIL FROM")
        if not mailbox.domain:
            return self._syntax("The sender address must include a domain")
        if mailbox.is_address_literal:
            verdict = _reject(mailbox.domain, "an address literal is not a domain", {})
        else:
            verdict = await check_sender_domain(self.resolver, mailbox.domain)
        ctx.facts["sender_domain"] = verdict.details
        return RuleResult(
            self.name, verdict.summary, verdict.action, verdict.reply, verdict.details
        )

    def _syntax(self, text: str) -> RuleResult:
        return RuleResult(self.name, text, Action.REJECT, Reply(553, "5.1.7", text))
