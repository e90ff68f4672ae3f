"""A generated ``[[tenants]]`` config: N customers with M networks each (IPv4 /24 to /32 and
one IPv6 /48), two domains each (one with subdomains).  Shared by bench.tenants and
bench.pipeline's ``--tenants``."""

from __future__ import annotations

import json
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


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def tenants_toml(count: int, first: dict[str, Any], networks_per_tenant: int = 4) -> str:
    """``[[tenants]]`` tables for an smg.toml: ``count`` generated customers, the first one
    updated with ``first`` (the bench's own clients, domain and DKIM key)."""
    tables = tenant_tables(count, networks_per_tenant)
    first_networks = first.pop("networks", [])
    tables[0] = {**tables[0], **first}
    tables[0]["networks"] = [*tables[0]["networks"], *first_networks]
    tables[0]["domains"] = [*tenant_tables(1)[0]["domains"], *first.get("domains", [])]
    lines = []
    for table in tables:
        lines.append("[[tenants]]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"
