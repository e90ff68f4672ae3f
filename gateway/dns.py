"""Asynchronous DNS lookups with a TTL cache, and the rules for what counts as a public address.

One :class:`Resolver` is shared by the whole relay (intake's sender check, delivery, MTA-STS,
blacklist checks).  Every lookup ends in a :class:`DnsResult` whose ``status`` is one of:

- ``ok``: the name has records of the type asked for (``records``);
- ``nxdomain``: the name does not exist;
- ``nodata``: the name exists but has no records of that type;
- ``tempfail``: no answer could be had (timeout, SERVFAIL, REFUSED, network error).  Callers
  must never turn a ``tempfail`` into a permanent decision.

Answers are cached for their TTL; negative answers (``nxdomain``/``nodata``) for the SOA
minimum of the zone (RFC 2308), capped by ``dns.negative_ttl_max``.  Temporary failures are
not cached.  Identical lookups in flight at the same time share one query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from gateway.config import DnsSection

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(address: IpAddress) -> IpAddress:
    """``::ffff:192.0.2.1`` (an IPv4 peer on a dual-stack socket, or such a record) as
    ``192.0.2.1``: every address rule of the relay judges an IPv4 address as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


OK = "ok"
NXDOMAIN = "nxdomain"
NODATA = "nodata"
TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class DnsResult:
    """The outcome of one lookup.

    ``rcode`` is the DNS response code as text (``NOERROR``, ``NXDOMAIN``, ``SERVFAIL``,
    ``REFUSED``...), ``TIMEOUT`` when no server answered in time, or ``BADNAME`` for a name that
    cannot exist in the DNS.  ``incomplete`` is set by :meth:`Resolver.addresses` when one of
    the two lookups (A or AAAA) failed temporarily: the records shown may not be all there are.
    """

    name: str
    rdtype: str
    status: str
    records: list[Any] = field(default_factory=list)
    ttl: int = 0
    rcode: str = "NOERROR"
    detail: str = ""
    incomplete: bool = False
    # DNSSEC: the resolver set AD (validated).  Queries ask with DO and AD; only the relay's
    # own validating resolver (roles/resolver, on loopback) is to be trusted with it.
    secure: bool = False

    @property
    def ok(self) -> bool:
        return self.status == OK

    def texts(self) -> list[str]:
        """The records in presentation format (``"10 mx.example.net."``, ``"192.0.0.1"``)."""
        return [record.to_text() for record in self.records]


@dataclass(frozen=True)
class MailHost:
    preference: int
    host: str  # without trailing dot, lower case


@dataclass(frozen=True)
class MailHosts:
    """Where mail for ``domain`` goes.

    ``status`` is that of the MX lookup, except for the implicit MX (RFC 5321 5.1): when the
    domain exists but has no MX records, ``hosts`` is the domain itself, ``implicit`` is true
    and ``status`` is ``ok``.  A null MX (RFC 7505: a single ``MX 0 .``) gives ``null_mx`` true
    and no hosts: the domain accepts no mail.
    """

    domain: str
    status: str
    hosts: list[MailHost] = field(default_factory=list)
    implicit: bool = False
    null_mx: bool = False
    ttl: int = 0
    rcode: str = "NOERROR"
    detail: str = ""
    secure: bool = False  # the MX RRset (or its absence) is DNSSEC-secure: DANE may apply

    @property
    def names(self) -> list[str]:
        return [entry.host for entry in self.hosts]


class _Cache:
    """A bounded LRU map (name, rdtype) -> (expiry on the monotonic clock, DnsResult)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, DnsResult]] = OrderedDict()

    def get(self, key: tuple[str, str], now: float) -> DnsResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, result = entry
        if expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return result

    def put(self, key: tuple[str, str], result: DnsResult, ttl: float, now: float) -> None:
        if ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (now + ttl, result)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Resolver:
    """Async lookups over dnspython with a TTL cache; see the module docstring."""

    def __init__(self, section: DnsSection | None = None, *, clock: Any = time.monotonic) -> None:
        self.section = section or DnsSection()
        self._clock = clock
        self._cache = _Cache(self.section.cache_size)
        self._in_flight: dict[tuple[str, str], asyncio.Future[DnsResult]] = {}
        self._public_extra = list(self.section.extra_public_networks)
        self._resolver = self._make_resolver(self.section)

    @staticmethod
    def _make_resolver(section: DnsSection) -> dns.asyncresolver.Resolver:
        if section.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in section.nameservers
            ]
        else:
            resolver = dns.asyncresolver.Resolver(configure=True)  # /etc/resolv.conf
        resolver.lifetime = section.timeout
        resolver.timeout = section.timeout
        resolver.retry_servfail = False  # SERVFAIL is an answer: tempfail now, retry later
        resolver.use_edns(0, dns.flags.DO, 1232)  # DNSSEC: say whether answers validated (AD)
        resolver.flags = dns.flags.RD | dns.flags.AD
        resolver.cache = None  # our own cache knows negative TTLs and the bound
        return resolver

    # --- lookups ------------------------------------------------------------------------

    async def query(self, name: str, rdtype: str) -> DnsResult:
        """Look ``name`` up for ``rdtype`` (``"MX"``, ``"A"``, ``"TXT"``...), cached."""
        key = (name.rstrip(".").lower(), rdtype.upper())
        cached = self._cache.get(key, self._clock())
        if cached is not None:
            return cached
        task = self._in_flight.get(key)
        if task is None:
            # One task per (name, type): callers that arrive meanwhile share it, and a caller
            # that is cancelled (its SMTP session ended) does not cancel the others' lookup.
            # The task ends by itself within the resolver's lifetime.
            task = asyncio.ensure_future(self._lookup(*key))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: tuple[str, str], task: asyncio.Future[DnsResult]) -> None:
        self._in_flight.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if result.status != TEMPFAIL:
            self._cache.put(key, result, result.ttl, self._clock())

    async def mail_hosts(self, domain: str) -> MailHosts:
        """MX hosts in preference order (ties shuffled), the implicit MX, or a null MX."""
        domain = domain.rstrip(".").lower()
        result = await self.query(domain, "MX")
        common = {"ttl": result.ttl, "rcode": result.rcode, "detail": result.detail,
                  "secure": result.secure}  # fmt: skip
        if result.status == NODATA:
            return MailHosts(domain, OK, [MailHost(0, domain)], implicit=True, **common)
        if result.status != OK:
            return MailHosts(domain, result.status, **common)
        targets = [
            (rr.preference, rr.exchange.to_text(omit_final_dot=True)) for rr in result.records
        ]
        real = [(pref, host.lower()) for pref, host in targets if host not in ("", ".")]
        if not real:  # only "MX 0 ." (RFC 7505); a mix keeps the real hosts
            return MailHosts(domain, OK, null_mx=True, **common)
        random.shuffle(real)  # equal preferences in random order (RFC 5321 5.1)...
        real.sort(key=lambda item: item[0])  # ...which the stable sort keeps
        return MailHosts(domain, OK, [MailHost(pref, host) for pref, host in real], **common)

    async def addresses(self, host: str) -> DnsResult:
        """A and AAAA records of ``host`` together (A first)."""
        a_result, aaaa_result = await asyncio.gather(
            self.query(host, "A"), self.query(host, "AAAA")
        )
        both = (a_result, aaaa_result)
        records = a_result.records + aaaa_result.records
        ok_parts = [part for part in both if part.status == OK]
        failed = [part for part in both if part.status == TEMPFAIL]
        name = host.rstrip(".").lower()
        if ok_parts:
            ttl = min(part.ttl for part in ok_parts)
            secure = all(part.secure for part in ok_parts)
            return DnsResult(name, "A+AAAA", OK, records, ttl, "NOERROR",
                             incomplete=bool(failed), secure=secure)  # fmt: skip
        if failed:
            first = failed[0]
            return DnsResult(name, "A+AAAA", TEMPFAIL, [], 0, first.rcode, first.detail)
        status = NXDOMAIN if NXDOMAIN in (a_result.status, aaaa_result.status) else NODATA
        ttl = min(a_result.ttl, aaaa_result.ttl)
        return DnsResult(name, "A+AAAA", status, [], ttl, a_result.rcode)

    def is_public(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Global unicast, or inside ``dns.extra_public_networks`` (lab and test ranges)."""
        try:
            address = unmapped(ipaddress.ip_address(ip))
        except ValueError:
            return False
        if any(address in network for network in self._public_extra):
            return True
        return address.is_global and not address.is_multicast

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    # --- the lookup itself ----------------------------------------------------------------

    async def _lookup(self, name: str, rdtype: str) -> DnsResult:
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError) as exc:
            return DnsResult(name, rdtype, NXDOMAIN, rcode="BADNAME", detail=str(exc))
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            ttl = self._negative_ttl(_nxdomain_response(exc, qname))
            return DnsResult(name, rdtype, NXDOMAIN, ttl=ttl, rcode="NXDOMAIN")
        except dns.resolver.NoNameservers as exc:
            return DnsResult(name, rdtype, TEMPFAIL, rcode=_failure_rcode(exc), detail=_short(exc))
        except dns.exception.Timeout as exc:
            return DnsResult(name, rdtype, TEMPFAIL, rcode="TIMEOUT", detail=_short(exc))
        except (dns.exception.DNSException, OSError) as exc:
            return DnsResult(name, rdtype, TEMPFAIL, rcode="ERROR", detail=_short(exc))
        secure = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            ttl = self._negative_ttl(answer.response)
            return DnsResult(name, rdtype, NODATA, ttl=ttl, rcode="NOERROR", secure=secure)
        records = list(answer.rrset)
        ttl = int(answer.rrset.ttl)
        return DnsResult(name, rdtype, OK, records, ttl, "NOERROR", secure=secure)

    def _negative_ttl(self, response: dns.message.Message | None) -> int:
        """RFC 2308: the lesser of the SOA record's TTL and its MINIMUM field, capped."""
        cap = int(self.section.negative_ttl_max)
        if response is None:
            return 0
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return min(int(rrset.ttl), int(rrset[0].minimum), cap)
        return 0  # no SOA: the answer says nothing about how long it holds


def _nxdomain_response(exc: dns.resolver.NXDOMAIN, qname: dns.name.Name) -> Any:
    responses = exc.kwargs.get("responses") or {}
    return responses.get(qname) or next(iter(responses.values()), None)


def _failure_rcode(exc: dns.resolver.NoNameservers) -> str:
    """The rcode the servers gave (SERVFAIL, REFUSED...), or ERROR if none answered."""
    for error in exc.kwargs.get("errors") or []:
        response = error[-1] if isinstance(error, tuple) else None
        if isinstance(response, dns.message.Message):
            return dns.rcode.to_text(response.rcode())
        text = str(error)
        for code in ("SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"):
            if code in text:
                return code
    return "ERROR"


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:200]
