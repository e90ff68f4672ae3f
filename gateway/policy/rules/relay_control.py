"""Relay control: only clients inside ``gateway.client_networks`` (with ``[[tenants]]``: a
customer's networks, or ``auth_networks`` after AUTH) may send through this gateway.

The intake checks it once, when a client connects (``gateway.intake.handler``: ``554 5.7.1``
instead of the greeting, then the connection is closed): a stranger never gets as far as MAIL
FROM, and the relay's chain does not ask again.  ``smg explain --client-ip`` runs the same
check as the first rule of the MAIL stage (``build_chain(..., relay_control=True)``) to show it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from gateway.dns import unmapped
from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage
from gateway.tenants import TenantTable


def client_allowed(client_ip: str, networks: Iterable[Any]) -> bool:
    """True if ``client_ip`` lies in one of ``networks`` (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        address = unmapped(ipaddress.ip_address(client_ip.split("%", 1)[0]))
    except ValueError:
        return False
    return any(address in network for network in networks)


def relay_denied(client_ip: str) -> Reply:
    return Reply(
        554, "5.7.1", f"Relay access denied: {client_ip} may not send through this gateway"
    )


def auth_required() -> Reply:
    """A client of ``auth_networks`` (no customer by address) at MAIL before it logged in."""
    return Reply(530, "5.7.0", "Authentication required: log in as your customer's user")


class RelayControlRule:
    name = "relay_control"
    stage = Stage.MAIL

    def __init__(self, client_networks: Iterable[Any], tenants: TenantTable | None = None) -> None:
        self.networks = list(client_networks)
        self.tenants = tenants  # a TenantTable: with customers, their networks decide

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        if self.tenants:
            return self._by_tenant(ctx)
        if client_allowed(ctx.client_ip, self.networks):
            return RuleResult(self.name, f"client {ctx.client_ip} is in gateway.client_networks")
        return self._denied(ctx, f"client {ctx.client_ip} is not in gateway.client_networks")

    def _denied(self, ctx: MessageContext, summary: str) -> RuleResult:
        return RuleResult(self.name, summary, Action.REJECT, relay_denied(ctx.client_ip),
                          details={"client_ip": ctx.client_ip})  # fmt: skip

    def _by_tenant(self, ctx: MessageContext) -> RuleResult:
        """With ``[[tenants]]`` the intake asks the customers' networks (longest prefix), then
        ``auth_networks`` (AUTH before MAIL), as ``gateway.intake.handler.identify`` does."""
        tenant = self.tenants.by_address(ctx.client_ip)
        if tenant is not None:
            return RuleResult(self.name, f"client {ctx.client_ip} is customer {tenant.name}'s")
        if self.tenants.may_authenticate(ctx.client_ip):
            return RuleResult(
                self.name,
                f"client {ctx.client_ip} is in gateway.auth_networks: it must log in (AUTH) "
                "as a customer's user first",
                Action.REJECT,
                auth_required(),
            )
        return self._denied(ctx, f"client {ctx.client_ip} is in no customer's networks")
