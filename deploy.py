"""The Secure Mail Gateway deploy: every gateway host from the inventory, idempotently.

    pyinfra inventories/lab.py deploy.py -y           # the lab (python -m lab up first)
    pyinfra inventories/production.py deploy.py --dry # what would change in production

The inventory validated itself once when pyinfra loaded it (deploykit/inventory.py): a broken
inventory stops before any host is contacted, and each host's relay config has been rendered
and checked with gateway.config.parse_config.  Here each host's values come from pyinfra's
``host.data`` (the same layers of group and host data the validation read), the fleet's from
the other hosts' data.  The roles are composed by the host's group:
good gateways get the scanners and the DKIM keys, the bad gateway only what it needs to send
spam on.  docs/deploy.md walks through it.
"""

import dataclasses

from pyinfra import host, inventory
from pyinfra.api.host import Host

from deploykit.dnscheck import held_for_deploy
from deploykit.fleet import Fleet
from deploykit.host import Gateway, gateway_from_host_data
from deploykit.problems import InventoryError, Problem
from deploykit.schema import KEYS
from roles import (
    base,
    blacklist,
    clamav,
    dkim,
    firewall,
    monitoring,
    relay,
    resolver,
    rspamd,
    tls,
    tlsrpt,
)


def _refuse_overrides() -> None:
    """``--data key=value`` would bypass the validation: the inventory is the only source."""
    overridden = sorted(set(inventory.get_override_data()) & set(KEYS))
    if overridden:
        raise InventoryError(
            [
                Problem("--data", key, "not allowed: edit the inventory instead")
                for key in overridden
            ]
        )


def _gateway(target: Host) -> Gateway:
    return gateway_from_host_data(target.name, target.groups, target.data.dict())


_refuse_overrides()
# Every host of the inventory, not only those of this run (--limit): the firewall and the
# relay config name the fleet's peers.
fleet = Fleet("the pyinfra inventory", tuple(_gateway(target) for target in inventory))
# Sign only with keys whose record is in DNS: an unverifiable signature hurts the customer.
fleet = dataclasses.replace(fleet, held_dkim=held_for_deploy(fleet))
gateway = fleet.get(host.name)
good = gateway.role == "good"

packages = firewall.PACKAGES + (clamav.PACKAGES + rspamd.PACKAGES if good else [])
packages += monitoring.packages(gateway)
packages += resolver.packages(gateway)
base.apply(gateway, packages)
firewall.apply(fleet, gateway)
resolver.apply(gateway)  # before the services that ask it
reload_relay_on = tls.apply(gateway)
if good:
    clamav.apply(gateway)
    rspamd.apply(gateway)
    reload_relay_on += dkim.apply(gateway)
relay.apply(fleet, gateway, reload_relay_on)
monitoring.apply(fleet, gateway)  # before the blacklist unit: it writes into node exporter's dir
blacklist.apply(gateway, fleet)
tlsrpt.apply(gateway)  # the daily TLS reports (RFC 8460): good gateways only
