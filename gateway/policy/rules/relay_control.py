"""Relay control: only clients inside ``gateway.client_networks`` may send through this gateway.

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


class RelayControlRule:
    name = "relay_control"
    stage = Stage.MAIL

    def __init__(self, client_networks: Iterable[Any]) -> None:
        self.networks = list(client_networks)

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        if client_allowed(ctx.client_ip, self.networks):
            return RuleResult(self.name, f"client {ctx.client_ip} is in gateway.client_networks")
        return RuleResult(
            self.name,
            f"client {ctx.client_ip} is not in gateway.client_networks",
            Action.REJECT,
            relay_denied(ctx.client_ip),
            details={"client_ip": ctx.client_ip},
        )
