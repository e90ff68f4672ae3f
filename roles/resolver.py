"""resolver: the host's own validating DNS resolver (unbound, Debian's package) on 127.0.0.1.

DANE (RFC 7672) needs to know that an answer is DNSSEC-secure; the relay trusts the AD flag
only from a resolver on the same host (docs/tls.md).  With ``local_resolver`` the relay and
rspamd ask it; it asks the inventory's ``resolvers`` (``forward-zone``; with
``resolver_stub`` they are authoritative servers, asked iteratively: the lab's DNS), or, without
any, the root servers.  Trust anchors: the inventory's ``dnssec_trust_anchors`` (the lab's
signed zones), else the root's key (RFC 5011 updates).  The whole ``/etc/unbound/unbound.conf``
is ours (Debian's ``conf.d`` snippets would add the root anchor to a lab's own).
"""

from __future__ import annotations

import ipaddress

from pyinfra.api import deploy
from pyinfra.operations import server, systemd

from deploykit.host import Gateway
from roles import ops
from roles.render import render

PACKAGES = ["unbound", "dns-root-data"]
CONFIG = "/etc/unbound/unbound.conf"


def packages(gateway: Gateway) -> list[str]:
    return PACKAGES if gateway["local_resolver"] else []


def config_text(gateway: Gateway) -> str:
    lab_like = bool(gateway["dnssec_trust_anchors"])
    return render(
        "resolver/unbound.conf.j2",
        trust_anchors=gateway["dnssec_trust_anchors"],
        upstreams=list(gateway["resolvers"]),
        stub=gateway["resolver_stub"],
        unblocked=_reverse_zones(gateway["extra_public_networks"]),
        cache_max_ttl=60 if lab_like else 86400,
        cache_max_negative_ttl=10 if lab_like else 3600,
    )


def _reverse_zones(networks: list[str]) -> list[str]:
    """Reverse zones of the networks the inventory calls public (a lab on TEST-NET-2): unbound
    answers the documentation networks' reverse names itself (NXDOMAIN) unless told not to."""
    zones = []
    for text in networks:
        network = ipaddress.ip_network(text, strict=False)
        if network.version == 4 and network.prefixlen >= 24:
            zones.append(network.network_address.reverse_pointer.split(".", 1)[1] + ".")
    return zones


@deploy("resolver: a validating unbound on loopback")
def apply(gateway: Gateway) -> None:
    if not gateway["local_resolver"]:
        return
    conf = ops.ensure(
        name="resolver: unbound.conf (loopback, validating)",
        items=[ops.File(CONFIG, config_text(gateway))],
    )
    server.shell(
        name="resolver: the config is valid",
        commands=[f"unbound-checkconf {CONFIG}"],
        _if=conf.did_change,
    )
    systemd.service(
        name="resolver: unbound enabled and running",
        service="unbound.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name="resolver: restart for the changed config",
        service="unbound.service",
        running=None,
        restarted=True,
        _if=conf.did_change,
    )
