"""The Secure Mail Gateway deploy: every gateway host from the inventory, idempotently.

    pyinfra inventories/lab.py deploy.py -y           # the lab (python -m lab up first)
    pyinfra inventories/production.py deploy.py --dry # what would change in production

The inventory validated itself when pyinfra loaded it (gateway/inventory.py): a broken
inventory stops before any host is contacted, and each host's relay config has been rendered
and checked with gateway.config.parse_config.  Here the roles are composed by the host's group:
good gateways get the scanners and the DKIM keys, the bad gateway only what it needs to send
spam on.  docs/deploy.md walks through it.
"""

from pyinfra import host, inventory

from gateway.inventory import KEYS, InventoryError, Problem, current_fleet
from roles import base, blacklist, clamav, dkim, firewall, relay, rspamd, tls


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


_refuse_overrides()
fleet = current_fleet([h.name for h in inventory])
gateway = fleet.get(host.name)
good = gateway.role == "good"

packages = firewall.PACKAGES + (clamav.PACKAGES + rspamd.PACKAGES if good else [])
base.apply(gateway, packages)
firewall.apply(fleet, gateway)
reload_relay_on = tls.apply(gateway)
if good:
    clamav.apply(gateway)
    rspamd.apply(gateway)
    reload_relay_on += dkim.apply(gateway)
relay.apply(fleet, gateway, reload_relay_on)
blacklist.apply(gateway)
