"""The virus-notice rule's parts (issue 12, point 4): the client's network, the sender check
on stub DNS answers, the 16 KiB bound of the quoted headers.  With real clamd and knot:
tests/integration/test_virus.py."""

from __future__ import annotations

import ipaddress

import dns.rdata
import pytest

from gateway.dns import NXDOMAIN, OK, TEMPFAIL, DnsResult, MailHost, MailHosts
from gateway.dsn import MAX_QUOTED, bounded_headers
from gateway.policy.notice import client_network, sender_check

NETWORKS = [ipaddress.ip_network(n) for n in ("10.1.0.0/16", "10.1.2.0/24", "2001:db8::/48")]


class StubDns:
    """``mx[domain]`` = MX host names; ``a[name]`` = addresses; ``failing`` names: TEMPFAIL."""

    def __init__(self, mx: dict[str, list[str]], a: dict[str, list[str]], failing=()) -> None:
        self.mx, self.a, self.failing = mx, a, set(failing)

    async def mail_hosts(self, domain: str) -> MailHosts:
        if domain not in self.mx:
            return MailHosts(domain, NXDOMAIN, rcode="NXDOMAIN")
        return MailHosts(domain, OK, [MailHost(10, h) for h in self.mx[domain]])

    async def addresses(self, host: str) -> DnsResult:
        if host in self.failing:
            return DnsResult(host, "A+AAAA", TEMPFAIL, [], 0, "SERVFAIL")
        texts = self.a.get(host, [])
        records = [dns.rdata.from_text("IN", "AAAA" if ":" in t else "A", t) for t in texts]
        return DnsResult(host, "A+AAAA", OK if records else NXDOMAIN, records)


@pytest.mark.parametrize(
    ("client", "network"),
    [
        ("10.1.2.7", "10.1.2.0/24"),  # the narrowest entry holding the client
        ("10.1.9.9", "10.1.0.0/16"),
        ("::ffff:10.1.2.7", "10.1.2.0/24"),  # an IPv4 client on a dual-stack socket
        ("2001:db8::25", "2001:db8::/48"),
        ("127.0.0.9", "127.0.0.9/32"),  # in no entry (smg explain): the address alone
    ],
)
def test_client_network(client: str, network: str) -> None:
    assert client_network(client, NETWORKS) == ipaddress.ip_network(network)


async def test_sender_check_rule() -> None:
    resolver = StubDns(
        mx={"own.example": ["mx.own.example"], "other.example": ["mx.other.example"],
            "hosted.example": ["mx.hoster.example"], "broken.example": ["mx.broken.example"]},
        a={"mx.own.example": ["10.1.2.25"], "mx.other.example": ["10.1.3.25"],
           "hosted.example": ["10.1.2.80"], "mx.hoster.example": ["198.51.100.5"],
           "v6.example": ["2001:db8::80"]},
        failing={"mx.broken.example"},
    )  # fmt: skip

    async def check(sender: str, client: str = "10.1.2.7"):
        return await sender_check(resolver, sender, client, NETWORKS)  # type: ignore[arg-type]

    assert (await check("a@own.example")).allowed  # its MX host is in the client's /24
    assert (await check("a@hosted.example")).allowed  # its own A record is
    assert (await check("a@v6.example", "2001:db8::1")).allowed
    other = await check("a@other.example")  # the same /16 but another customer's /24
    assert not other.allowed and "10.1.2.0/24" in other.reason
    assert not (await check("a@nx.example")).allowed
    broken = await check("a@broken.example")
    assert not broken.allowed and "DNS failed: mx.broken.example: SERVFAIL" in broken.reason
    assert not (await check("no-domain")).allowed


def test_bounded_headers_quotes_whole_fields_up_to_16_kib() -> None:
    fields = b"".join(b"X-F%03d: %s\r\n folded\r\n" % (i, b"v" * 90) for i in range(300))
    quoted = bounded_headers(b"Subject: s\r\n" + fields + b"\r\nbody\r\n")
    assert len(quoted) <= MAX_QUOTED and quoted.endswith(b" folded\r\n")
    assert quoted.startswith(b"Subject: s\r\nX-F000: ")
    small = b"Subject: s\r\nFrom: a@b\r\n"
    assert bounded_headers(small + b"\r\nbody") == small == bounded_headers(small)
    assert bounded_headers(b"X-Huge: " + b"h" * 20000 + b"\r\n\r\n") == b""
