"""Whether a virus notice may go out, and which original headers it may quote (issue 12).

Virus mail usually carries a forged envelope sender: a notice to it is backscatter to a
stranger.  Until tenants exist (issue 11) the notice goes only to a sender whose domain
*resolves to the client's network* (docs/policy.md, "Virus notices"):

- the client's network is the narrowest ``gateway.client_networks`` entry that holds the
  client's IP (the IP alone if none does, e.g. ``smg explain``);
- the sender domain resolves there when an address of one of its MX hosts (the first
  :data:`MAX_MX_HOSTS`; the implicit MX when it has none) or of the domain itself (A/AAAA)
  lies in that network.

Anything else (another customer's network, no such domain, a DNS failure) sends no notice; the
caller logs :attr:`NoticeCheck.reason`.

The quoted headers are the original's header fields that fit whole in 16 KiB
(``dsn.MAX_QUOTED``), and only once clamd said that very block is clean: one INSTREAM of the
block (a scan per field would cost one round trip each and is not needed to be sound).  When
clamd flags the block, or gives no verdict, nothing from the headers is quoted, not even the
Subject in the text part.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.dns import NODATA, NXDOMAIN, OK, TEMPFAIL, Resolver, unmapped
from gateway.dsn import bounded_headers
from gateway.scanners.clamd import ClamdClient, ClamdError

log = logging.getLogger("smg.pipeline")

MAX_MX_HOSTS = 10  # MX hosts of the sender domain looked at (RFC 7208's lookup limit, too)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NoticeCheck:
    """``allowed``: the notice may go to the sender; ``reason`` says why (or why not)."""

    allowed: bool
    reason: str


def client_network(client_ip: str, client_networks: Iterable[Any]) -> Network:
    """The narrowest entry of ``client_networks`` that holds ``client_ip`` (the IP alone as a
    /32 or /128 when none does)."""
    address = unmapped(ipaddress.ip_address(client_ip))
    holding = [net for net in client_networks if address.version == net.version and address in net]
    if not holding:
        return ipaddress.ip_network(address)
    return max(holding, key=lambda net: net.prefixlen)


async def sender_check(
    resolver: Resolver, sender: str, client_ip: str, client_networks: Iterable[Any]
) -> NoticeCheck:
    """May a virus notice go to ``sender``?  Only if its domain resolves to the client's
    network (see the module docstring)."""
    domain = sender.rpartition("@")[2].rstrip(".").lower()
    if not domain or "@" not in sender:
        return NoticeCheck(False, f"sender <{sender}> has no domain")
    try:
        network = client_network(client_ip, client_networks)
    except ValueError:
        return NoticeCheck(False, f"client address {client_ip!r} is not an IP address")
    hosts, failures = await _sender_hosts(resolver, domain)
    results = await asyncio.gather(*(resolver.addresses(host) for host in hosts))
    for host, result in zip(hosts, results, strict=True):
        if result.status == TEMPFAIL:
            failures.append(f"{host}: {result.rcode}")
        for record in result.records:
            if _inside(record.to_text(), network):
                return NoticeCheck(True, f"{host} has {record.to_text()}, inside {network}")
    why = f"sender domain {domain} does not resolve to the client's network {network}"
    if failures:
        why += f" (DNS failed: {', '.join(failures)})"
    return NoticeCheck(False, why)


async def _sender_hosts(resolver: Resolver, domain: str) -> tuple[list[str], list[str]]:
    """The names whose addresses count: the domain itself and its first MX hosts."""
    mail = await resolver.mail_hosts(domain)
    failures = [] if mail.status in (OK, NXDOMAIN, NODATA) else [f"MX: {mail.rcode}"]
    hosts = [domain]
    for name in mail.names[:MAX_MX_HOSTS]:
        if name not in hosts:
            hosts.append(name)
    return hosts, failures


def _inside(text: str, network: Network) -> bool:
    try:
        address = unmapped(ipaddress.ip_address(text))
    except ValueError:
        return False
    return address.version == network.version and address in network


async def quotable_headers(clamd: ClamdClient | None, original: bytes, virus: str) -> bytes:
    """The header block a notice may quote: bounded, and clean by clamd's own scan of it;
    empty when clamd flags it or gives no verdict."""
    block = bounded_headers(original)
    if not block:
        return b""
    if clamd is None:
        log.info("virus %s: no clamd to scan the headers, none quoted in the notice", virus)
        return b""
    try:
        result = await clamd.scan(block)
    except ClamdError as exc:
        log.warning("virus %s: headers not scanned (%s), none quoted in the notice", virus, exc)
        return b""
    if result.infected:
        log.info("virus %s: clamd flags the header block (%s), none quoted", virus, result.virus)
        return b""
    return block
