"""A generated ``[[tenants]]`` config: N customers with M networks each (IPv4 /24 to /32 and
one IPv6 /48), two domains each (one with subdomains).  Shared by bench.tenants and
bench.pipeline's ``--tenants``."""

from __future__ import annotations

from typing import Any

_PREFIXES = (24, 28, 29, 32)


def tenant_tables(count: int, networks_per_tenant: int = 4) -> list[dict[str, Any]]:
    """``count`` tenants in 10.0.0.0/8 and 2001:db8::/32; the last network of tenant 0 is
    127.0.25.0/24 (the benches' clients), so the bench's own mail has a tenant."""
    tenants = []
    for index in range(count):
        networks = []
        for n in range(networks_per_tenant - 1):
            plen = _PREFIXES[n % len(_PREFIXES)]
            networks.append(f"10.{index // 256 * 4 + n}.{index % 256}.0/{plen}")
        networks.append(f"2001:db8:{index:x}::/48")
        tenants.append(
            {
                "name": f"t{index}",
                "networks": networks,
                "domains": [f"t{index}.example", f".t{index}.example"],
            }
        )
    return tenants


def generated_config(count: int, networks_per_tenant: int = 4) -> dict[str, Any]:
    return {
        "gateway": {"hostname": "bench.example.net"},
        "spam": {"enabled": False},
        "tenants": tenant_tables(count, networks_per_tenant),
    }
