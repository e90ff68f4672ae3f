"""Zone texts as knotd is given them by the lab's DNS (lab/dns.py) and the tests' KnotDNS
(tests/harness/knot.py): written by hand without SOA, NS or $TTL, completed here."""

from __future__ import annotations

import dns.exception
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.zone

SOA_TIMERS = "3600 600 86400"  # refresh retry expire: irrelevant (no secondaries)


def render_zone(
    fqdn: str,
    text: str,
    serial: int,
    *,
    ttl: int,
    nameserver: str,
    hostmaster: str,
    negative_ttl: int,
    error: type[Exception],
) -> str:
    """`text` with a $TTL of `ttl` unless it has one, an SOA carrying `serial` (the one it has,
    or `nameserver hostmaster serial SOA_TIMERS negative_ttl`) and, unless it has one, an NS
    record for `nameserver` at the apex. A text that does not parse raises `error`."""
    if "$TTL" not in text:
        text = f"$TTL {ttl}\n{text}"
    try:
        zone = dns.zone.from_text(text, origin=fqdn, relativize=False, check_origin=False)
    except dns.exception.DNSException as exc:
        raise error(f"zone {fqdn} does not parse: {exc}\n{text}") from exc
    apex = zone.find_node(fqdn, create=True)
    soa = apex.get_rdataset(dns.rdataclass.IN, dns.rdatatype.SOA)
    if soa is None:
        soa_text = f"{nameserver} {hostmaster} {serial} {SOA_TIMERS} {negative_ttl}"
        zone.replace_rdataset(fqdn, _rdataset(ttl, "SOA", soa_text))
    else:
        zone.replace_rdataset(fqdn, _rdataset(ttl, "SOA", str(soa[0].replace(serial=serial))))
    if apex.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS) is None:
        zone.replace_rdataset(fqdn, _rdataset(ttl, "NS", nameserver))
    return zone.to_text(relativize=False)


def _rdataset(ttl: int, rdtype: str, rdata: str) -> dns.rdataset.Rdataset:
    return dns.rdataset.from_text("IN", rdtype, ttl, rdata)
