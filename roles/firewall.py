"""firewall: nftables.  SMTP into a good gateway only from the customer networks, into a bad
gateway only from the good gateways; SSH from ``ssh_networks``; loopback free; the rest dropped.
"""

from __future__ import annotations

import ipaddress

from pyinfra.api import deploy
from pyinfra.operations import systemd

from deploykit.fleet import Fleet
from deploykit.host import Gateway
from roles import ops
from roles.render import render

PACKAGES = ["nftables"]
CONF = "/etc/nftables.conf"


def by_family(networks: list[str]) -> list[tuple[str, list[str]]]:
    """[("ip", [...v4]), ("ip6", [...v6])], leaving out a family with no networks."""
    parsed = [ipaddress.ip_network(n, strict=False) for n in networks]
    out = []
    for family, version in (("ip", 4), ("ip6", 6)):
        members = [str(n) for n in parsed if n.version == version]
        if members:
            out.append((family, members))
    return out


def smtp_sources(fleet: Fleet, gateway: Gateway) -> tuple[str, list[str]]:
    if gateway.role == "good":
        return "the customer networks", list(gateway["customer_networks"])
    return "the good gateways", [g.public_address for g in fleet.good]


def nftables_conf(fleet: Fleet, gateway: Gateway) -> str:
    label, smtp = smtp_sources(fleet, gateway)
    return render(
        "firewall/nftables.conf.j2",
        host_name=gateway.name,
        role=gateway.role,
        smtp_from_label=label,
        smtp_networks=by_family(smtp),
        ssh_networks=by_family(list(gateway["ssh_networks"])),
    )


@deploy("firewall: nftables")
def apply(fleet: Fleet, gateway: Gateway) -> None:
    conf = ops.ensure(
        name="nftables: the gateway's rules",
        items=[ops.File(CONF, nftables_conf(fleet, gateway), mode="755")],
    )
    systemd.service(
        name="nftables: enabled", service="nftables.service", running=True, enabled=True
    )
    systemd.service(
        name="nftables: load the changed rules",
        service="nftables.service",
        running=None,  # only the reload: never a start as well
        reloaded=True,
        _if=conf.did_change,
    )
