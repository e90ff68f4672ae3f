"""The lab: the same fleet as production on this machine (``python -m lab up``).

    pyinfra inventories/lab.py deploy.py -y

Hosts, addresses, the SSH key and the lab CA come from lab/run/state.json (written by
``python -m lab up``; ``SMG_LAB_STATE`` points elsewhere for tests).  The fleet's data comes
from ``group_data/`` like production's; the ``lab`` group below overrides what differs in the
lab: mirrors via apt-cacher-ng, the lab's DNS, its customer network, test domains, the lab
DNSBL.  A change request in the lab is an edit of that group's data.
"""

import json as _json
import os as _os
from pathlib import Path as _Path

from deploykit.inventory import validate_inventory

_STATE_FILE = _Path(_os.environ.get("SMG_LAB_STATE", "lab/run/state.json"))
if not _STATE_FILE.is_file():
    raise SystemExit(f"{_STATE_FILE}: no such file: the lab is not up (python -m lab up)")
_STATE = _json.loads(_STATE_FILE.read_text())


def _host(name: str) -> tuple[str, dict]:
    entry = _STATE["hosts"][name]
    return (
        name,
        {
            "fqdn": entry["fqdn"],
            "public_address": entry["address"],
            # Behind the lab's 1:1 NAT (lab/net.py): the relay listens and sends here.
            "listen_address": entry.get("private_address"),
            "tls_cert_file": entry["cert"],
            "tls_key_file": entry["key"],
            "ssh_hostname": entry["address"],
            "ssh_user": "root",
            "ssh_key": _STATE["ssh_key"],
            # The lab's host keys are new at every `up`.
            "ssh_known_hosts_file": "/dev/null",
            "ssh_strict_host_key_checking": "no",
        },
    )


good = [_host(n) for n, h in sorted(_STATE["hosts"].items()) if h["role"] == "good"]
bad = [_host(n) for n, h in sorted(_STATE["hosts"].items()) if h["role"] == "bad"]


def _customer(name: str, default: str) -> str:
    """A customer host's address from the lab state (older states: the fixed address)."""
    return _STATE.get("customers", {}).get(name, {}).get("address", default)


# customer-c's AUTH password in the lab: LAB_CUSTOMER_C_PASSWORD in tests/acceptance.
_CUSTOMER_C_HASH = (
    "$scrypt$ln=14,r=8,p=1$lI7SZ4uUA2TdFOI6AXXtOw$1YwbjuDF/6R8w6ucqgqL0IviTFmK/EsyB6AKwSUtySk"
)

_TENANTS = [
    {
        "name": "customer-a",
        "networks": [_STATE["customer"]["address"] + "/32"],
        "domains": ["customer-a.example", ".customer-a.example"],
        # The customer host also plays the flood and slow-client attacker (test_bad_input):
        # the gateway's own max_connections (200) must bite there, not the tenant's 20/10.
        # It also sends the suites' GTUBE and EICAR mail: at the default suspension rule (half
        # spam of 20 in 10 min) rerunning a spam test would suspend it; 500 keeps the rule on
        # but out of the other tests' way.  test_tenants tightens these on one gateway.
        "limits": {"max_sessions": 300, "max_sessions_per_ip": 300, "suspend_min_messages": 500},
        "dkim": [{"domain": "customer-a.example", "selector": "lab", "algorithm": "rsa"}],
        "tls_rules": [
            {
                "sender": "customer-a.example",
                "recipient": "partner-tls.example",
                "level": "verify",
                "on_failure": "hold",
            },
        ],
    },
    {
        "name": "customer-b",
        "networks": [_customer("customer-b", "198.51.100.31") + "/32"],
        "domains": ["customer-b.example"],
        "dkim": [{"domain": "customer-b.example", "selector": "lab", "algorithm": "ed25519"}],
        "tls_rules": [
            {
                "sender": "customer-b.example",
                "recipient": "partner-plain.example",
                "level": "encrypt",
                "on_failure": "reject",
            },
            # issue 14: rejected in the session when it cannot go; DANE required
            {
                "sender": "customer-b.example",
                "recipient": "partner-tls.example",
                "level": "dane",
                "on_failure": "reject",
            },
            {
                "sender": "customer-b.example",
                "recipient": "partner-slow.example",
                "level": "encrypt",
                "on_failure": "reject",
            },
        ],
    },
    {
        "name": "customer-c",
        "domains": ["customer-c.example"],
        "auth": [{"user": "relay@customer-c.example", "password_hash": _CUSTOMER_C_HASH}],
    },
]

lab = (
    [name for name, _ in good + bad],
    {
        "apt_proxy": _STATE["apt_proxy"],
        "resolvers": [_STATE["dns"]["address"]],
        # Each gateway validates DNSSEC itself (DANE): unbound asks the lab DNS (authoritative,
        # so as a stub) and trusts the keys of the lab's signed zones (lab/zones.py).
        "local_resolver": True,
        "resolver_stub": True,
        "dnssec_trust_anchors": _STATE["dns"].get("trust_anchors", []),
        # TEST-NET-2 is documentation space: in the lab it counts as public.
        "extra_public_networks": [_STATE["network"]],
        # The customers (issue 11): customer-a on the lab's customer host, customer-b on its
        # own, customer-c AUTH only from auth_networks (LAB_CUSTOMER_C_PASSWORD in
        # tests/acceptance/test_tenants.py: a lab secret).  customer_networks: replaced.
        "customer_networks": [],
        "tenants": _TENANTS,
        "auth_networks": ["198.51.100.40/29"],
        # SSH only from this machine (the lab bridge): pyinfra and testinfra.
        "ssh_networks": [_STATE["bridge"]["address"] + "/32"],
        # No freshclam in the lab: the kit's own signature set (EICAR and friends).
        "clamav_mirror": None,
        "internal_ca_file": _STATE["pki"]["ca_cert"],
        # The far ends' certificates come from the lab CA too.
        "public_ca_file": _STATE["pki"]["ca_cert"],
        "tls_rules": [],  # each customer's own: _TENANTS
        # Made on purpose, as in production: python -m deploykit dkim-keys inventories/lab.py
        # (make keys; scripts/lab.sh and scripts/test.sh run it before the deploy).
        "dkim_keys_dir": "keys/lab",
        "dkim_domains": [
            # fleet-wide keys (each customer's own are in _TENANTS)
        ],
        # The fleet's SPF record, served by the lab DNS (lab/zones.py): dns-check checks it.
        "spf_domain": "spf.lab.example",
        "operations_mailbox": "fmb-change@partner-plain.example",
        # Quick alerts for the acceptance tests (tests/acceptance/test_monitoring.py).
        "scrape_interval": "5s",
        "alert_for": {"*": "15s"},
        # Two monitor hosts, leader with fallback (docs/blacklist.md); the lab's head start is
        # short so the acceptance suite can wait it out.
        "blacklist_monitor_hosts": ["otc-de-mta01", "otc-de-mta02"],
        "blacklist_fallback_delay": 10,
        "dnsbl_zones": [
            {"zone": _STATE["dns"]["dnsbl_zone"], "name": "lab DNSBL", "major": True},
        ],
    },
)

# Last: refuse a broken inventory before pyinfra connects to any host.
validate_inventory(__file__, globals())
