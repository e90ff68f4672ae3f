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
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.addresses import AddressError, parse_path
from gateway.dns import NXDOMAIN, TEMPFAIL, DnsResult, Resolver
from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage

MAX_MX_HOSTS = 10  # MX hosts looked at, in preference order (a domain needs one public one)
# A verdict is reused for at most this long, and never longer than the smallest TTL of the
# answers it came from: within that time the resolver's cache would give the same answers.
VERDICT_SECONDS = 5.0
MAX_CACHED_VERDICTS = 4096


@dataclass
class SenderVerdict:
    """``action`` None: the domain is fine; else REJECT or TEMPFAIL with ``reply``."""

    domain: str
    action: Action | None
    reply: Reply | None
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    ttl: int = 0  # the smallest TTL of the DNS answers the verdict rests on (0: unknown)

    @property
    def exit_code(self) -> int:
        """For ``smg check-sender``: 0 accept, 1 reject, 2 temporary failure."""
        return {None: 0, Action.REJECT: 1}.get(self.action, 2)


def _reject(domain: str, why: str, details: dict[str, Any], ttl: int = 0) -> SenderVerdict:
    reply = Reply(550, "5.1.8", f"Sender Domain must resolve ({domain}: {why})")
    return SenderVerdict(domain, Action.REJECT, reply, why, details, ttl)


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
    ttl = hosts.ttl
    if hosts.status == NXDOMAIN:
        return _reject(domain, "no such domain", details, ttl)
    if hosts.null_mx:
        return _reject(domain, "null MX, the domain takes no mail (RFC 7505)", details, ttl)
    unsure: list[str] = []
    if not hosts.implicit:
        names = hosts.names[:MAX_MX_HOSTS]
        details["mx"] = names
        if len(names) == 1:  # the usual case: no gather, no extra task
            results = [await resolver.addresses(names[0])]
        else:
            results = await asyncio.gather(*(resolver.addresses(name) for name in names))
        for name, result in zip(names, results, strict=True):
            ttl = min(ttl, result.ttl)
            public = _public(resolver, result)
            if public:
                details.update(via="mx", host=name, public=public)
                summary = f"MX {name} has public {public[0]}"
                return SenderVerdict(domain, None, None, summary, details, ttl)
            if result.status == TEMPFAIL or result.incomplete:
                unsure.append(f"{name}: {result.rcode}")
    own = await resolver.addresses(domain)
    ttl = min(ttl, own.ttl)
    public = _public(resolver, own)
    if public:
        details.update(via="address", public=public)
        summary = f"{domain} has public {public[0]}"
        return SenderVerdict(domain, None, None, summary, details, ttl)
    if own.status == TEMPFAIL or own.incomplete:
        unsure.append(f"{domain}: {own.rcode}")
    if unsure:
        details["tempfail"] = unsure
        return _tempfail(domain, "address lookup: " + ", ".join(unsure), details)
    if own.texts():
        details["not_public"] = own.texts()
        why = "only non-public addresses " + ", ".join(own.texts())
        return _reject(domain, why, details, ttl)
    if "mx" in details:
        why = "no MX host with a public address and no A/AAAA record"
        return _reject(domain, why, details, ttl)
    return _reject(domain, "no MX and no A/AAAA record", details, ttl)


class SenderDomainRule:
    name = "sender_domain"
    stage = Stage.MAIL

    def __init__(self, resolver: Resolver, clock: Any = time.monotonic) -> None:
        self.resolver = resolver
        self._clock = clock
        # domain -> (expiry, verdict): accepts and 550s only; a 451 is never reused, so a
        # domain whose DNS recovers is accepted at the client's next try.
        self._verdicts: dict[str, tuple[float, SenderVerdict]] = {}

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
            verdict = await self._verdict(mailbox.domain)
        ctx.facts["sender_domain"] = dict(verdict.details)  # the verdict may be reused
        return RuleResult(
            self.name, verdict.summary, verdict.action, verdict.reply, verdict.details
        )

    async def _verdict(self, domain: str) -> SenderVerdict:
        """:func:`check_sender_domain`, reused per domain for min(TTL, VERDICT_SECONDS)."""
        key = domain.rstrip(".").lower()
        now = self._clock()
        cached = self._verdicts.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = await check_sender_domain(self.resolver, key)
        lifetime = min(float(verdict.ttl), VERDICT_SECONDS)
        if verdict.action != Action.TEMPFAIL and lifetime > 0:
            if len(self._verdicts) >= MAX_CACHED_VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = (now + lifetime, verdict)
        return verdict

    def _syntax(self, text: str) -> RuleResult:
        return RuleResult(self.name, text, Action.REJECT, Reply(553, "5.1.7", text))
