"""The tenant table: longest prefix for IPv4 and IPv6, IPv4-mapped addresses, AUTH users and
domain ownership."""

from __future__ import annotations

import ipaddress

from gateway.config import TenantDefaults
from gateway.tenants import PrefixTable, Tenant, TenantTable


def tenant(name: str, networks: list[str], domains: list[str], **kw: object) -> Tenant:
    nets = tuple(ipaddress.ip_network(n) for n in networks)
    return Tenant(name, tuple(domains), TenantDefaults(), nets, **kw)  # type: ignore[arg-type]


TABLE = TenantTable(
    [
        tenant("wide", ["198.51.100.0/24", "2001:db8::/32"], ["wide.example"]),
        tenant("narrow", ["198.51.100.32/28", "2001:db8:30::/48"], ["narrow.example"]),
        tenant("host", ["198.51.100.33/32", "2001:db8:30::1/128"], [".host.example"]),
        tenant("auth", [], ["auth.example"], users={"Relay@Auth.example": "$scrypt$x"}),
    ],
    [ipaddress.ip_network("198.51.100.40/29")],
)


def name(address: str) -> str | None:
    found = TABLE.by_address(address)
    return found.name if found else None


def test_longest_prefix_ipv4() -> None:
    assert name("198.51.100.33") == "host"
    assert name("198.51.100.34") == "narrow"
    assert name("198.51.100.47") == "narrow"
    assert name("198.51.100.48") == "wide"
    assert name("198.51.101.1") is None


def test_longest_prefix_ipv6() -> None:
    assert name("2001:db8:30::1") == "host"
    assert name("2001:db8:30::2") == "narrow"
    assert name("2001:db8:31::2") == "wide"
    assert name("2001:db9::1") is None
    assert name("fe80::1%eth0") is None


def test_ipv4_mapped_is_judged_as_ipv4() -> None:
    assert name("::ffff:198.51.100.33") == "host"
    assert name("::ffff:198.51.100.48") == "wide"


def test_garbage_is_no_tenant() -> None:
    for text in ("", "1", "1.2", "999.1.1.1", "not an address", "::g"):
        assert name(text) is None


def test_auth_networks_and_users() -> None:
    assert TABLE.may_authenticate("198.51.100.41") and not TABLE.may_authenticate("198.51.100.1")
    found = TABLE.user("relay@auth.EXAMPLE")
    assert found is not None and found[0].name == "auth" and found[1] == "$scrypt$x"
    assert TABLE.user("nobody@auth.example") is None


def test_domain_owner() -> None:
    assert TABLE.owner("WIDE.example.").name == "wide"  # type: ignore[union-attr]
    assert TABLE.owner("a.b.host.example").name == "host"  # type: ignore[union-attr]
    assert TABLE.owner("host.example") is None  # ".host.example": subdomains only
    assert TABLE.owner("example") is None
    host = TABLE.get("host")
    assert host is not None and host.owns("x.host.example") and not host.owns("host.example")


def test_prefix_table_many_lengths() -> None:
    table = PrefixTable()
    for plen in range(8, 33):
        table.add(ipaddress.ip_network(f"10.0.0.0/{plen}"), plen)
    assert table.lookup("10.0.0.0") == 32 and table.lookup("10.0.0.1") == 31
    assert table.lookup("10.128.0.0") == 8 and table.lookup("11.0.0.0") is None
