"""gateway.dns against an in-process fake DNS server (answers, cache, failures)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.config import DnsSection, parse_config
from gateway.dns import Resolver
from tests.unit.fakedns import FakeZone, start_fake_dns


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def zone() -> FakeZone:
    zone = FakeZone()
    zone.add("mx.example.net", "MX", "10 mx1.example.net.", "20 mx2.example.net.")
    zone.add("mx1.example.net", "A", "198.51.100.10")
    zone.add("aonly.example.net", "A", "198.51.100.20")
    zone.add("aonly.example.net", "AAAA", "2001:db8::20")
    zone.add("nullmx.example.net", "MX", "0 .")
    zone.add("ties.example.net", "MX", *[f"10 mx{i}.example.net." for i in range(8)], "5 first.x.")
    zone.servfail.add("broken.example.net")
    zone.refused.add("refused.example.net")
    zone.silent.add("silent.example.net")
    return zone


@pytest.fixture
async def resolver_and_clock(zone: FakeZone) -> AsyncIterator[tuple[Resolver, Clock]]:
    transport, port = await start_fake_dns(zone)
    clock = Clock()
    section = _section(nameservers=[f"127.0.0.1:{port}"], timeout="300ms")
    yield Resolver(section, clock=clock), clock
    transport.close()


def _section(**dns: object) -> DnsSection:
    data = {"gateway": {"hostname": "gw.example.net", "role": "bad"}, "dns": dns}
    return parse_config(data).dns


async def test_mx_in_preference_order(resolver_and_clock) -> None:
    resolver, _ = resolver_and_clock
    hosts = await resolver.mail_hosts("MX.example.net.")
    assert hosts.status == "ok" and not hosts.implicit and not hosts.null_mx
    assert hosts.names == ["mx1.example.net", "mx2.example.net"]
    assert [h.preference for h in hosts.hosts] == [10, 20]


async def test_mx_ties_are_shuffled_but_ordered(resolver_and_clock) -> None:
    resolver, _ = resolver_and_clock
    orders = set()
    for _ in range(20):
        hosts = await resolver.mail_hosts("ties.example.net")
        assert hosts.names[0] == "first.x"
        assert [h.preference for h in hosts.hosts] == [5] + [10] * 8
        orders.add(tuple(hosts.names))
    assert len(orders) > 1  # 8! orders: 20 equal draws would be a broken shuffle


async def test_implicit_mx_when_domain_has_no_mx(resolver_and_clock) -> None:
    resolver, _ = resolver_and_clock
    hosts = await resolver.mail_hosts("aonly.example.net")
    assert hosts.status == "ok" and hosts.implicit
    assert hosts.names == ["aonly.example.net"]


async def test_null_mx(resolver_and_clock) -> None:
    resolver, _ = resolver_and_clock
    hosts = await resolver.mail_hosts("nullmx.example.net")
    assert hosts.status == "ok" and hosts.null_mx and hosts.hosts == []


async def test_nxdomain_and_nodata(resolver_and_clock) -> None:
    resolver, _ = resolver_and_clock
    missing = await resolver.query("nope.example.net", "MX")
    assert (missing.status, missing.rcode, missing.ttl) == ("nxdomain", "NXDOMAIN", 60)
    nodata = await resolver.query("mx.example.net", "TXT")
    assert (nodata.status, nodata.records, nodata.ttl) == ("nodata", [], 60)
    hosts = await resolver.mail_hosts("nope.example.net")
    assert hosts.status == "nxdomain" and hosts.hosts == []


async def test_servfail_refused_and_timeout_are_tempfail(resolver_and_clock) -> None:
    resolver, _ = resolver_and_clock
    servfail = await resolver.query("broken.example.net", "MX")
    assert (servfail.status, servfail.rcode) == ("tempfail", "SERVFAIL")
    refused = await resolver.query("refused.example.net", "A")
    assert (refused.status, refused.rcode) == ("tempfail", "REFUSED")
    loop = asyncio.get_running_loop()
    started = loop.time()
    silent = await resolver.query("silent.example.net", "MX")
    assert (silent.status, silent.rcode) == ("tempfail", "TIMEOUT")
    assert loop.time() - started < 2.0
    assert (await resolver.mail_hosts("broken.example.net")).status == "tempfail"


async def test_addresses_joins_a_and_aaaa(resolver_and_clock) -> None:
    resolver, _ = resolver_and_clock
    both = await resolver.addresses("aonly.example.net")
    assert both.status == "ok" and both.texts() == ["198.51.100.20", "2001:db8::20"]
    a_only = await resolver.addresses("mx1.example.net")
    assert a_only.status == "ok" and a_only.texts() == ["198.51.100.10"]
    assert (await resolver.addresses("nope.example.net")).status == "nxdomain"
    assert (await resolver.addresses("mx.example.net")).status == "nodata"
    assert (await resolver.addresses("broken.example.net")).status == "tempfail"


async def test_positive_cache_follows_ttl(resolver_and_clock, zone: FakeZone) -> None:
    resolver, clock = resolver_and_clock
    await resolver.query("mx.example.net", "MX")
    await resolver.query("MX.EXAMPLE.NET.", "MX")
    assert zone.queries.count(("mx.example.net", "MX")) == 1
    clock.now += 301  # zone TTL is 300
    await resolver.query("mx.example.net", "MX")
    assert zone.queries.count(("mx.example.net", "MX")) == 2


async def test_negative_cache_by_soa_minimum_capped(zone: FakeZone) -> None:
    zone.soa_minimum = 86400
    zone.soa_ttl = 86400
    transport, port = await start_fake_dns(zone)
    clock = Clock()
    resolver = Resolver(
        _section(nameservers=[f"127.0.0.1:{port}"], negative_ttl_max="2m"), clock=clock
    )
    result = await resolver.query("nope.example.net", "A")
    assert result.ttl == 120
    await resolver.query("nope.example.net", "A")
    assert zone.queries.count(("nope.example.net", "A")) == 1
    clock.now += 121
    await resolver.query("nope.example.net", "A")
    assert zone.queries.count(("nope.example.net", "A")) == 2
    transport.close()


async def test_tempfail_is_not_cached(resolver_and_clock, zone: FakeZone) -> None:
    resolver, _ = resolver_and_clock
    await resolver.query("broken.example.net", "A")
    await resolver.query("broken.example.net", "A")
    assert zone.queries.count(("broken.example.net", "A")) == 2


async def test_concurrent_lookups_share_one_query(resolver_and_clock, zone: FakeZone) -> None:
    resolver, _ = resolver_and_clock
    results = await asyncio.gather(*[resolver.query("mx.example.net", "MX") for _ in range(10)])
    assert all(r.status == "ok" for r in results)
    assert zone.queries.count(("mx.example.net", "MX")) == 1


async def test_cache_is_bounded(zone: FakeZone) -> None:
    for i in range(10):
        zone.add(f"h{i}.example.net", "A", f"198.51.100.{i}")
    transport, port = await start_fake_dns(zone)
    resolver = Resolver(_section(nameservers=[f"127.0.0.1:{port}"], cache_size=4))
    for i in range(10):
        await resolver.query(f"h{i}.example.net", "A")
    assert resolver.cache_entries == 4
    transport.close()


async def test_bad_names_are_nxdomain_without_a_query(resolver_and_clock, zone) -> None:
    resolver, _ = resolver_and_clock
    result = await resolver.query("a" * 70 + ".example.net", "MX")
    assert (result.status, result.rcode) == ("nxdomain", "BADNAME")
    assert zone.queries == []


def test_is_public() -> None:
    resolver = Resolver(
        _section(nameservers=["127.0.0.1:1"], extra_public_networks=["127.0.0.0/8"])
    )
    assert resolver.is_public("8.8.8.8")
    assert resolver.is_public("2a00:1450::1")
    assert resolver.is_public("127.0.0.5")  # extra_public_networks
    for private in [
        "10.1.2.3",
        "192.168.1.1",
        "172.16.0.1",
        "100.64.0.1",
        "169.254.1.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00::1",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "198.51.100.1",
        "not an ip",
    ]:
        assert not resolver.is_public(private), private
    assert resolver.is_public("::ffff:127.0.0.9")
    strict = Resolver(_section(nameservers=["127.0.0.1:1"]))
    assert not strict.is_public("127.0.0.5")
