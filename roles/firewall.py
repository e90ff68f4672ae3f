"""firewall: nftables.  SMTP into a good gateway only from the customer networks, into a bad
gateway only from the good gateways; SSH from ``ssh_networks``; loopback free; the rest dropped.

Out: no SMTP (25, 465, 587) or HTTPS (443, MTA-STS) to internal networks (RFC 1918, link-local,
shared address space, IPv6 ULA and link-local), except to the fleet's own hosts, a private lab
network (``extra_public_networks``) and the inventory's own endpoints written as addresses.  It
backs up the relay's own rule (gateway/delivery/screen.py): a domain whose MX points inside our
networks must not make the host talk to them (issue 12).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from pyinfra.api import deploy
from pyinfra.operations import systemd

from deploykit.fleet import Fleet
from deploykit.host import Gateway
from deploykit.render import customer_networks
from roles import ops
from roles.monitoring import ALERTMANAGER_PORT, NODE_PORT, PROMETHEUS_PORT
from roles.render import render

PACKAGES = ["nftables"]
CONF = "/etc/nftables.conf"

# Destinations delivery and MTA-STS must never reach on EGRESS_PORTS (loopback needs no rule:
# the relay itself refuses it, and local services such as notify_via 127.0.0.1:25 live there).
INTERNAL_NETWORKS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
)
EGRESS_PORTS = (25, 465, 587, 443)
# Inventory keys naming an endpoint the host itself talks to (a URL, or notify_via's host).
ENDPOINT_URL_KEYS = ("debian_mirror", "debian_security_mirror", "apt_proxy", "clamav_mirror",
                     "ticket_url")  # fmt: skip


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
    # The fallback blacklist monitors ask a monitor ranked before them whether its relay
    # answers (docs/blacklist.md); the relay itself refuses them as clients.
    peers = [
        g.source_address
        for g in fleet
        if gateway.runs_blacklist_monitor and g.runs_blacklist_monitor and g is not gateway
    ]
    if gateway.role == "good":
        # the tenants' networks (or the old customer_networks) and the AUTH-only networks
        mine = [*customer_networks(gateway), *gateway["auth_networks"]]
        networks = list(dict.fromkeys([*mine, *peers]))
        return "the customer networks" + (" and the other monitors" if peers else ""), networks
    sources = list(dict.fromkeys([*(g.source_address for g in fleet.good), *peers]))
    return "the good gateways" + (" and the other monitors" if peers else ""), sources


def _internal(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return any(
        network.version == internal.version and network.overlaps(internal)
        for internal in map(ipaddress.ip_network, INTERNAL_NETWORKS)
    )


def _endpoint_addresses(gateway: Gateway) -> list[str]:
    """The inventory's own endpoints that are written as addresses (names cannot be known
    here: docs/deploy.md says to write an internal endpoint on these ports as an address)."""
    hosts = [urlsplit(gateway[key]).hostname or "" for key in ENDPOINT_URL_KEYS if gateway[key]]
    if gateway["notify_via"]:
        hosts.append(gateway["notify_via"][0])
    out = []
    for host in hosts:
        try:
            network = ipaddress.ip_network(host)
        except ValueError:
            continue
        if _internal(network):
            out.append(str(network))
    return out


def egress_allowed(fleet: Fleet, gateway: Gateway) -> list[str]:
    """Internal destinations still reachable on EGRESS_PORTS: the fleet's hosts (a bad gateway
    may live on a private address), a private lab network, the inventory's own endpoints."""
    addresses = [a for g in fleet for a in (g.listen_address, g.source_address, g.public_address)]
    fleet_hosts = [str(ipaddress.ip_network(a)) for a in addresses]
    lab = [
        str(network)
        for network in map(ipaddress.ip_network, gateway["extra_public_networks"])
        if _internal(network)
    ]
    return list(dict.fromkeys(fleet_hosts + lab + _endpoint_addresses(gateway)))


def monitoring_sources(fleet: Fleet, gateway: Gateway) -> list[str]:
    """Who may scrape the relay's metrics and node exporter: the monitoring host only."""
    name = gateway["monitoring_host"]
    if name is None:
        return []
    monitor = fleet.get(name)
    return list(dict.fromkeys([monitor.listen_address, monitor.source_address]))


def monitoring_ports(gateway: Gateway) -> tuple[str, str]:
    """(scraped ports, web ports of Prometheus and Alertmanager on the monitoring host)."""
    scraped = f"{gateway['relay_metrics_port']}, {NODE_PORT}"
    return scraped, f"{PROMETHEUS_PORT}, {ALERTMANAGER_PORT}"


def nftables_conf(fleet: Fleet, gateway: Gateway) -> str:
    label, smtp = smtp_sources(fleet, gateway)
    scraped, web = monitoring_ports(gateway)
    is_monitor = gateway["monitoring_host"] == gateway.name
    return render(
        "firewall/nftables.conf.j2",
        host_name=gateway.name,
        role=gateway.role,
        smtp_from_label=label,
        smtp_networks=by_family(smtp),
        ssh_networks=by_family(list(gateway["ssh_networks"])),
        egress_ports=", ".join(str(port) for port in EGRESS_PORTS),
        egress_allowed=by_family(egress_allowed(fleet, gateway)),
        internal_networks=by_family(list(INTERNAL_NETWORKS)),
        metrics_networks=by_family(monitoring_sources(fleet, gateway)),
        metrics_ports=scraped,
        web_networks=by_family(list(gateway["ssh_networks"])) if is_monitor else [],
        web_ports=web,
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
