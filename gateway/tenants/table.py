"""The tenant table: which customer a client address (longest prefix) or an AUTH user is, and
which customer owns a domain.

Built once per config (start, SIGHUP) from ``[[tenants]]``.  The address lookup runs at every
connection, so it avoids ``ipaddress`` objects on the way: the address becomes one int, and for
each prefix length in use (longest first) one dict holds the networks of that length keyed by
their address shifted right by the host bits.  With 500 tenants and 2000 networks in a handful
of prefix lengths a lookup is a few dict probes (bench/tenants.py measures it).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config, TenantDefaults, effective_limits

_BITS = {4: 32, 6: 128}


@dataclass(frozen=True)
class Tenant:
    """One customer as the relay works with it."""

    name: str
    domains: tuple[str, ...]
    limits: TenantDefaults
    networks: tuple[Any, ...] = ()
    users: dict[str, str] = field(default_factory=dict)  # user -> password hash
    dkim: tuple[Any, ...] = ()  # DkimKey
    tls_rules: tuple[Any, ...] = ()  # TlsRule

    def owns(self, domain: str) -> bool:
        name = domain.lower().rstrip(".")
        if name in self.domains:
            return True
        return any(d.startswith(".") and name.endswith(d) for d in self.domains)


class PrefixTable:
    """Longest-prefix match of IPv4 and IPv6 addresses to values."""

    def __init__(self) -> None:
        # version -> [(prefix length, host bits, {network int >> host bits: value})], longest first
        self._levels: dict[int, list[tuple[int, int, dict[int, Any]]]] = {4: [], 6: []}

    def add(self, network: Any, value: Any) -> None:
        bits = _BITS[network.version]
        levels = self._levels[network.version]
        for plen, _shift, table in levels:
            if plen == network.prefixlen:
                table[int(network.network_address) >> (bits - plen)] = value
                return
        levels.append((network.prefixlen, bits - network.prefixlen, {}))
        levels.sort(key=lambda level: -level[0])
        self.add(network, value)

    def lookup(self, address: str) -> Any:
        """The value of the longest network holding ``address`` (text, IPv4, IPv6 or
        IPv4-mapped IPv6, with or without a ``%zone``), or None."""
        parsed = _to_int(address)
        if parsed is None:
            return None
        version, number = parsed
        for _plen, shift, table in self._levels[version]:
            value = table.get(number >> shift)
            if value is not None:
                return value
        return None


def _to_int(address: str) -> tuple[int, int] | None:
    try:
        if ":" not in address:
            if address.count(".") != 3:  # inet_aton also takes "1" or "1.2"
                return None
            return 4, int.from_bytes(socket.inet_aton(address), "big")
        number = int.from_bytes(socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0]), "big")
    except (OSError, ValueError):
        return None
    if number >> 32 == 0xFFFF:  # IPv4-mapped: judged as the IPv4 address
        return 4, number & 0xFFFFFFFF
    return 6, number


class TenantTable:
    """The customers of one config; empty when it has no ``[[tenants]]``."""

    def __init__(self, tenants: Iterable[Tenant], auth_networks: Iterable[Any] = ()) -> None:
        self.tenants: dict[str, Tenant] = {}
        self._networks = PrefixTable()
        self._auth_networks = PrefixTable()
        self._users: dict[str, Tenant] = {}
        self._exact: dict[str, Tenant] = {}
        self._below: dict[str, Tenant] = {}
        for tenant in tenants:
            self.tenants[tenant.name] = tenant
            for network in tenant.networks:
                self._networks.add(network, tenant)
            for user in tenant.users:
                self._users[user.lower()] = tenant
            for domain in tenant.domains:
                (self._below if domain.startswith(".") else self._exact)[domain] = tenant
        for network in auth_networks:
            self._auth_networks.add(network, True)

    @classmethod
    def from_config(cls, config: Config) -> TenantTable:
        return cls(
            (
                Tenant(
                    name=t.name,
                    domains=tuple(t.domains),
                    limits=effective_limits(config.tenant_defaults, t.limits),
                    networks=tuple(t.networks),
                    users={u.user: u.password_hash for u in t.auth},
                    dkim=tuple(t.dkim),
                    tls_rules=tuple(t.tls_rules),
                )
                for t in config.tenants
            ),
            config.gateway.auth_networks,
        )

    def __bool__(self) -> bool:
        return bool(self.tenants)

    def __len__(self) -> int:
        return len(self.tenants)

    def by_address(self, address: str) -> Tenant | None:
        """The customer whose network holds ``address`` (longest prefix), or None."""
        return self._networks.lookup(address)

    def may_authenticate(self, address: str) -> bool:
        """Is ``address`` in ``gateway.auth_networks`` (may connect, must log in)?"""
        return self._auth_networks.lookup(address) is not None

    def user(self, name: str) -> tuple[Tenant, str] | None:
        """The customer and the password hash of AUTH user ``name`` (case-insensitive)."""
        tenant = self._users.get(name.lower())
        if tenant is None:
            return None
        stored = next(h for u, h in tenant.users.items() if u.lower() == name.lower())
        return tenant, stored

    def owner(self, domain: str) -> Tenant | None:
        """The customer owning ``domain`` (exact, else the nearest ``.parent``), or None."""
        name = domain.lower().rstrip(".")
        tenant = self._exact.get(name)
        if tenant is not None:
            return tenant
        labels = name.split(".")
        for cut in range(1, len(labels)):
            tenant = self._below.get("." + ".".join(labels[cut:]))
            if tenant is not None:
                return tenant
        return None

    def get(self, name: str) -> Tenant | None:
        return self.tenants.get(name)
