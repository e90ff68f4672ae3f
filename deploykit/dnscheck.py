"""The fleet's DNS records, as a change request needs them: looked up, compared, and what is
missing written as zone-file lines for the customer or the DNS team.

``python -m deploykit dns-check INVENTORY`` checks
- each DKIM selector's TXT record (``<selector>._domainkey.<domain>``) against the key file;
- the fleet's SPF record (``spf_domain``): every gateway's public address is in an ``ip4:`` or
  ``ip6:`` mechanism;
- each gateway's PTR (its public address names its ``fqdn``) and the forward confirmation
  (``fqdn`` has the public address);
- for each forced-TLS rule at level ``dane`` (fleet-wide or a customer's) that names one
  recipient domain: every MX host of that domain has TLSA records (``_25._tcp.<mx>``), else
  the rule defers all of its mail (the partner's DNS team publishes them: no zone line can be
  proposed for a key we do not hold).

The deploy uses :func:`unpublished_dkim_keys`: a key whose record is not visible is not put in
the relay config (the relay would sign, and every receiver would fail the signature), unless the
inventory says ``dkim_unpublished_ok``.  Lookups go to the inventory's ``resolvers`` (the lab's
DNS) or the control machine's own resolver (public DNS).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.nameserver
import dns.resolver
import dns.reversename

from deploykit.dkim_keys import dkim_wanted
from deploykit.fleet import Fleet
from deploykit.schema import dkim_key_path
from gateway.config import parse_host_port
from gateway.dkim import dns_record_value, load_private_key, zone_line

TIMEOUT = 5.0  # per lookup: the check is interactive, a dead resolver must not hang it
TTL = 3600  # of the records proposed


@dataclass(frozen=True)
class Finding:
    what: str  # "DKIM customer.example s1", "PTR otc-de-mta01", ...
    ok: bool
    detail: str  # what was found
    fix: tuple[str, ...] = ()  # zone-file lines to publish when not ok


class Lookup:
    """TXT, PTR and address lookups at the given nameservers ("ip" or "ip:port"), or the
    system's; every answer is a list of strings, empty when the name has none."""

    def __init__(self, nameservers: Iterable[str] = ()) -> None:
        servers = [parse_host_port(s, default_port=53) for s in nameservers]
        self.resolver = dns.resolver.Resolver(configure=not servers)
        if servers:
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
        self.resolver.lifetime = TIMEOUT
        self.resolver.cache = None  # a change request publishes and looks again at once

    def answers(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = self.resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{name} {rdtype}: {exc}") from None
        if rdtype == "TXT":
            return [b"".join(r.strings).decode(errors="replace") for r in answer]
        return [r.to_text() for r in answer]


class LookupFailed(Exception):
    """No answer at all (timeout, SERVFAIL): neither present nor missing."""


def lookup_for(fleet: Fleet, nameservers: list[str] | None = None) -> Lookup:
    """The given nameservers, else the inventory's resolvers, else the system's."""
    if nameservers:
        return Lookup(nameservers)
    resolvers = fleet.gateways[0]["resolvers"] if fleet.gateways else []
    return Lookup(resolvers)


# -- DKIM -----------------------------------------------------------------------------------------


def _tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        name, _, tag_value = part.partition("=")
        if name.strip():
            tags[name.strip()] = "".join(tag_value.split())
    return tags


def dkim_finding(lookup: Lookup, domain: str, selector: str, key_path: Path) -> Finding:
    """Is the TXT record of this selector there with this key's public half?"""
    name = f"{selector}._domainkey.{domain}"
    expected = dns_record_value(load_private_key(key_path))
    fix = (zone_line(name, expected, TTL),)
    what = f"DKIM {name}"
    try:
        found = [t for t in lookup.answers(name, "TXT") if "p=" in t]
    except LookupFailed as exc:
        return Finding(what, False, f"lookup failed: {exc}", fix)
    if not found:
        return Finding(what, False, "no DKIM TXT record", fix)
    want = _tags(expected)["p"]
    if any(_tags(t).get("p") == want for t in found):
        return Finding(what, True, "published, matches the key")
    return Finding(what, False, "published with another public key", fix)


def dkim_findings(fleet: Fleet, lookup: Lookup) -> list[Finding]:
    out = []
    for (domain, selector), (_, keys_dir) in sorted(dkim_wanted(fleet).items()):
        out.append(
            dkim_finding(lookup, domain, selector, dkim_key_path(keys_dir, domain, selector))
        )
    return out


def unpublished_dkim_keys(fleet: Fleet, lookup: Lookup | None = None) -> dict[tuple[str, str], str]:
    """(domain, selector) -> why, for every key not to sign with yet: its record is not
    visible.  Empty when the inventory says ``dkim_unpublished_ok``."""
    if not fleet.good or fleet.good[0]["dkim_unpublished_ok"] or not dkim_wanted(fleet):
        return {}
    lookup = lookup or lookup_for(fleet)
    out = {}
    for (domain, selector), (_, keys_dir) in sorted(dkim_wanted(fleet).items()):
        finding = dkim_finding(lookup, domain, selector, dkim_key_path(keys_dir, domain, selector))
        if not finding.ok:
            out[(domain, selector)] = finding.detail
    return out


# -- SPF, PTR, forward confirmation ---------------------------------------------------------------


def spf_finding(fleet: Fleet, lookup: Lookup) -> Finding | None:
    spf_domain = fleet.gateways[0]["spf_domain"] if fleet.gateways else None
    if not spf_domain:
        return None
    addresses = list(dict.fromkeys(g.public_address for g in fleet))
    mechanisms = " ".join(f"ip{ipaddress.ip_address(a).version}:{a}" for a in addresses)
    fix = (zone_line(spf_domain, f"v=spf1 {mechanisms} -all", TTL),)
    what = f"SPF {spf_domain}"
    try:
        records = [t for t in lookup.answers(spf_domain, "TXT") if t.lower().startswith("v=spf1")]
    except LookupFailed as exc:
        return Finding(what, False, f"lookup failed: {exc}", fix)
    if len(records) != 1:
        detail = "no SPF record" if not records else f"{len(records)} SPF records (RFC 7208: one)"
        return Finding(what, False, detail, fix)
    covered = _spf_networks(records[0])
    missing = [a for a in addresses if not any(ipaddress.ip_address(a) in n for n in covered)]
    if missing:
        return Finding(what, False, f"does not list {', '.join(missing)}", fix)
    return Finding(what, True, "lists every gateway's public address")


def _spf_networks(record: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The ip4:/ip6: mechanisms that pass (no include: or a: is followed: list addresses)."""
    out = []
    for term in record.split()[1:]:
        qualifier = term[0] if term[0] in "+-~?" else "+"
        term = term.lstrip("+-~?")
        if qualifier == "+" and term.lower().startswith(("ip4:", "ip6:")):
            try:
                out.append(ipaddress.ip_network(term[4:], strict=False))
            except ValueError:
                continue
    return out


def ptr_findings(fleet: Fleet, lookup: Lookup) -> list[Finding]:
    out = []
    for gateway in fleet:
        address, fqdn = gateway.public_address, gateway.fqdn
        reverse = dns.reversename.from_address(address).to_text()
        rtype = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
        try:
            names = [n.rstrip(".").lower() for n in lookup.answers(reverse, "PTR")]
            forward = lookup.answers(fqdn, rtype)
        except LookupFailed as exc:
            out.append(Finding(f"PTR {gateway.name}", False, f"lookup failed: {exc}"))
            continue
        ptr_ok = fqdn in names
        out.append(Finding(
            f"PTR {gateway.name} {address}", ptr_ok,
            f"names {', '.join(names) or 'nothing'}",
            () if ptr_ok else (f"{reverse} {TTL} IN PTR {fqdn}.",),
        ))  # fmt: skip
        forward_ok = address in forward
        out.append(Finding(
            f"{rtype} {fqdn}", forward_ok, f"has {', '.join(forward) or 'no address'}",
            () if forward_ok else (f"{fqdn}. {TTL} IN {rtype} {address}",),
        ))  # fmt: skip
    return out


# -- TLSA for DANE rules --------------------------------------------------------------------------


def dane_domains(fleet: Fleet) -> list[str]:
    """Recipient domains of the ``dane`` rules of the good gateways and their customers; only
    plain domains (a ``.suffix`` or ``*`` pattern names no MX to look up)."""
    found: list[str] = []
    for gateway in fleet.good:
        tenants = gateway["tenants"] if isinstance(gateway["tenants"], list) else []
        rules = list(gateway["tls_rules"] or []) + [
            rule for tenant in tenants if isinstance(tenant, dict)
            for rule in tenant.get("tls_rules", [])
        ]  # fmt: skip
        for rule in rules:
            recipient = str(rule.get("recipient", "")).lower().rstrip(".")
            plain = recipient and not recipient.startswith((".", "*"))
            if rule.get("level") == "dane" and plain and recipient not in found:
                found.append(recipient)
    return sorted(found)


def tlsa_findings(fleet: Fleet, lookup: Lookup) -> list[Finding]:
    out = []
    for domain in dane_domains(fleet):
        what = f"TLSA {domain} (dane rule)"
        try:
            exchanges = [r.split()[-1].rstrip(".") for r in lookup.answers(domain, "MX")]
            exchanges = [mx for mx in exchanges if mx] or [domain]  # no MX: the domain itself
            missing = [mx for mx in exchanges if not lookup.answers(f"_25._tcp.{mx}", "TLSA")]
        except LookupFailed as exc:
            out.append(Finding(what, False, f"lookup failed: {exc}"))
            continue
        if missing:
            fix = tuple(
                f"; {domain}'s DNS team: _25._tcp.{mx}. IN TLSA 3 1 1 <SHA-256 of {mx}'s key>"
                for mx in missing
            )
            detail = f"no TLSA record for {', '.join(missing)}: its mail waits (deferred)"
            out.append(Finding(what, False, detail, fix))
        else:
            out.append(Finding(what, True, f"TLSA records for {', '.join(exchanges)}"))
    return out


def check(fleet: Fleet, lookup: Lookup) -> list[Finding]:
    findings = dkim_findings(fleet, lookup)
    spf = spf_finding(fleet, lookup)
    if spf is not None:
        findings.append(spf)
    return findings + ptr_findings(fleet, lookup) + tlsa_findings(fleet, lookup)


def report(findings: list[Finding]) -> str:
    """One line per record, then the zone-file lines of what is missing."""
    lines = [f"{'ok     ' if f.ok else 'MISSING'} {f.what}: {f.detail}" for f in findings]
    fixes = [line for f in findings if not f.ok for line in f.fix]
    if fixes:
        lines += ["", "; to publish (zone-file lines):", *fixes]
    return "\n".join(lines) + "\n"


_HELD: dict[tuple[tuple[str, str], ...], dict[tuple[str, str], str]] = {}


def held_for_deploy(fleet: Fleet) -> frozenset[tuple[str, str]]:
    """The keys deploy.py leaves out of the relay configs, looked up once per deploy (pyinfra
    runs deploy.py once per host in one process), each named once on stderr."""
    wanted = tuple(sorted(dkim_wanted(fleet)))
    if wanted not in _HELD:
        _HELD[wanted] = unpublished_dkim_keys(fleet)
        for (domain, selector), why in _HELD[wanted].items():
            print(
                f"warning: not signing with {selector}._domainkey.{domain} yet: {why} "
                "(publish it: python -m deploykit dns-check INVENTORY; or dkim_unpublished_ok)",
                file=sys.stderr,
            )
    return frozenset(_HELD[wanted])
