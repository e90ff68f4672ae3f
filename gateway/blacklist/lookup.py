"""Ask every zone about every address, through :class:`gateway.dns.Resolver`.

The resolver is built per check (``resolver_for``), so no DNSBL answer outlives the check that
asked for it.  Before a zone is trusted, its RFC 5782 test points are asked: 127.0.0.2 must be
listed (else the list does not answer us: unregistered resolver, public resolver, list gone)
and 127.0.0.1 must not (else the list "lists the world").  A zone that fails makes every
result of that zone *unknown*.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from dataclasses import dataclass

from gateway.blacklist.answers import CLEAN, LISTED, UNKNOWN, query_name, read_codes
from gateway.blacklist.zones import ZoneSpec
from gateway.config import Config
from gateway.dns import NODATA, NXDOMAIN, OK, DnsResult, Resolver

CONCURRENCY = 16  # lookups in flight at once: gentle on the lists' rate limits


@dataclass(frozen=True)
class Result:
    ip: str
    zone: str
    list_name: str
    major: bool
    status: str  # LISTED, CLEAN or UNKNOWN
    codes: tuple[str, ...] = ()
    meaning: str = ""  # listed: what the codes mean; unknown: why it is unknown
    reason: str = ""  # listed: the list's TXT record, if it has one
    query: str = ""

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "codes": list(self.codes)}


def resolver_for(config: Config) -> Resolver:
    """A fresh resolver for one check: ``blacklist.nameservers``/``timeout`` over ``[dns]``."""
    section = config.blacklist
    dns_section = dataclasses.replace(
        config.dns,
        nameservers=section.nameservers or config.dns.nameservers,
        timeout=section.timeout,
    )
    return Resolver(dns_section)


async def lookup_all(
    resolver: Resolver, addresses: list[str], specs: list[ZoneSpec]
) -> tuple[list[Result], list[tuple[str, str]]]:
    """Results for every (address, zone) asked, and the pairs not asked (IPv6 on a list
    without IPv6 data)."""
    gate = asyncio.Semaphore(CONCURRENCY)
    health = await asyncio.gather(*(_zone_health(resolver, spec, gate) for spec in specs))
    jobs = []
    skipped = []
    for ip in addresses:
        is_v6 = ipaddress.ip_address(ip).version == 6
        for spec, problem in zip(specs, health, strict=True):
            if is_v6 and not spec.ipv6:
                skipped.append((ip, spec.zone))
            elif problem is not None:
                jobs.append(_unknown(ip, spec, problem))
            else:
                jobs.append(_check_one(resolver, ip, spec, gate))
    return list(await asyncio.gather(*jobs)), skipped


async def _unknown(ip: str, spec: ZoneSpec, why: str) -> Result:
    return _result(ip, spec, UNKNOWN, meaning=why, query=query_name(ip, spec.zone))


async def _check_one(
    resolver: Resolver, ip: str, spec: ZoneSpec, gate: asyncio.Semaphore
) -> Result:
    name = query_name(ip, spec.zone)
    async with gate:
        answer = await resolver.query(name, "A")
    if answer.status in (NXDOMAIN, NODATA):
        return _result(ip, spec, CLEAN, query=name)
    if answer.status != OK:
        return _result(ip, spec, UNKNOWN, meaning=_failure(answer), query=name)
    reading = read_codes(answer.texts(), spec.listing_codes, spec.error_codes)
    if reading.status != LISTED:
        return _result(ip, spec, UNKNOWN, reading.codes, reading.meaning, query=name)
    async with gate:
        txt = await resolver.query(name, "TXT")
    return _result(ip, spec, LISTED, reading.codes, reading.meaning, _txt(txt), name)


async def _zone_health(resolver: Resolver, spec: ZoneSpec, gate: asyncio.Semaphore) -> str | None:
    """None if the zone answers its RFC 5782 test points as it must, else what is wrong."""
    if not spec.test_points:
        return None
    async with gate:
        listed, clean = await asyncio.gather(
            resolver.query(query_name("127.0.0.2", spec.zone), "A"),
            resolver.query(query_name("127.0.0.1", spec.zone), "A"),
        )
    if listed.status != OK:
        if listed.status in (NXDOMAIN, NODATA):
            return (
                "test point 127.0.0.2 is not listed: the list does not answer this resolver "
                "(unregistered or public resolver?) or has stopped"
            )
        return f"test point 127.0.0.2: {_failure(listed)}"
    reading = read_codes(listed.texts(), spec.listing_codes, spec.error_codes)
    if reading.status != LISTED:
        return f"test point 127.0.0.2 answered {reading.meaning}"
    if clean.status == OK:
        return (
            f"test point 127.0.0.1 is listed ({', '.join(clean.texts())}): the list answers "
            "'listed' for everything"
        )
    if clean.status not in (NXDOMAIN, NODATA):
        return f"test point 127.0.0.1: {_failure(clean)}"
    return None


def _failure(answer: DnsResult) -> str:
    detail = f" ({answer.detail})" if answer.detail and answer.rcode != "SERVFAIL" else ""
    return f"no answer: {answer.rcode}{detail}"


def _txt(answer: DnsResult) -> str:
    if answer.status != OK:
        return ""
    texts = [
        b"".join(record.strings).decode("utf-8", "replace").strip() for record in answer.records
    ]
    return " | ".join(text for text in texts if text)


def _result(
    ip: str,
    spec: ZoneSpec,
    status: str,
    codes: tuple[str, ...] = (),
    meaning: str = "",
    reason: str = "",
    query: str = "",
) -> Result:
    return Result(ip, spec.zone, spec.name, spec.major, status, codes, meaning, reason, query)
