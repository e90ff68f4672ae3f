"""Sender binding (issue 11): a customer sends only as itself.

MAIL stage (:class:`SenderBindingRule`): the envelope sender's domain must be one the client's
customer owns (``[[tenants]] domains``; ``.domain`` for its subdomains), else
``550 5.7.1 Sender domain <d> is not registered for customer <name>``.  The null sender ``<>``
stays allowed (the customer's own NDRs); a sender without a domain gets ``553 5.1.7``.

DATA stage (:class:`FromBindingRule`): every address of the From: header must be in a domain
the customer owns, with the same 550: otherwise customer A could write ``From: ceo@<B's
domain>`` under its own envelope sender.

An untenanted message (no ``[[tenants]]``, or the bad gateway) is not judged here.
"""

from __future__ import annotations

import email.utils

from gateway.policy import headers
from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage
from gateway.tenants import Tenant, TenantTable


def not_registered(domain: str, tenant: str) -> Reply:
    return Reply(550, "5.7.1", f"Sender domain {domain} is not registered for customer {tenant}")


class SenderBindingRule:
    name = "sender_binding"
    stage = Stage.MAIL

    def __init__(self, tenants: TenantTable) -> None:
        self.tenants = tenants

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        tenant = self.tenants.get(ctx.tenant) if ctx.tenant else None
        if tenant is None:
            return RuleResult(self.name, "untenanted client: no sender binding")
        sender = ctx.mail_from
        if sender == "":
            return RuleResult(self.name, f"null sender of customer {tenant.name}: allowed")
        domain = sender.rpartition("@")[2].rstrip(".").lower() if "@" in sender else ""
        if not domain:
            reply = Reply(553, "5.1.7", f"Sender address <{sender}> has no domain")
            return RuleResult(self.name, "sender without a domain", Action.REJECT, reply)
        if tenant.owns(domain):
            return RuleResult(self.name, f"{domain} belongs to customer {tenant.name}")
        return RuleResult(
            self.name,
            f"{domain} is not registered for customer {tenant.name}",
            Action.REJECT,
            not_registered(domain, tenant.name),
            details={"domain": domain, "tenant": tenant.name},
        )


class FromBindingRule:
    name = "from_binding"
    stage = Stage.DATA

    def __init__(self, tenants: TenantTable) -> None:
        self.tenants = tenants

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        tenant = self.tenants.get(ctx.tenant) if ctx.tenant else None
        if tenant is None:
            return RuleResult(self.name, "untenanted client: no From: binding")
        foreign = _foreign_domains(tenant, headers.get_values(ctx.data, "From"))
        if not foreign:
            return RuleResult(self.name, f"From: domains belong to customer {tenant.name}")
        domain = foreign[0]
        return RuleResult(
            self.name,
            f"From: domain {domain} is not registered for customer {tenant.name}",
            Action.REJECT,
            not_registered(domain, tenant.name),
            details={"domain": domain, "tenant": tenant.name},
        )


def _foreign_domains(tenant: Tenant, values: list[str]) -> list[str]:
    """The From: domains ``tenant`` does not own (an address without a domain counts as
    foreign: it would be completed by someone else's rules downstream)."""
    foreign = []
    for _name, address in email.utils.getaddresses(values):
        domain = address.rpartition("@")[2].rstrip(">").rstrip(".").lower()
        if "@" not in address or not tenant.owns(domain):
            foreign.append(domain or address or "(none)")
    return foreign
