"""DANE for SMTP (RFC 7672, matching per RFC 7671 / RFC 6698).

Lookups go to the relay's resolvers (``dns.nameservers``: on our hosts the local validating
unbound, ``roles/resolver``) with the DO bit and AD requested; an answer counts as **secure**
only when the resolver sets AD.  Never trust AD from a resolver across a network you do not
control: the hosts ask their own unbound on loopback.

For a recipient domain whose MX RRset is secure (RFC 7672 2.2.1), each MX host's TLSA RRset
``_25._tcp.<mx host>`` is looked up:

- secure with usable records: that host needs DANE: TLS 1.2+, and the peer's chain must match a
  record.  Usable (RFC 7672 3.1): DANE-TA(2) and DANE-EE(3); PKIX-TA(0)/PKIX-EE(1) are ignored,
  and so are unknown selectors and matching types.  DANE-EE: the leaf matches (no name, no
  expiry check, RFC 7672 3.1.1); DANE-TA: a certificate of the chain above the leaf matches,
  and the chain from the leaf up to it is valid for the MX host name (RFC 7672 3.1.2);
- secure with records, none usable: mandatory unauthenticated TLS (``encrypt``, RFC 7672 2.2);
- insecure, no TLSA (NXDOMAIN/NODATA): no DANE for that host;
- the lookup failed (SERVFAIL: bogus or unreachable) under a secure MX: the host is not used
  now (a temporary failure, RFC 7672 2.2.3): an attacker must not strip DANE by making the
  TLSA lookup fail.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gateway.dns import Resolver

DANE_TA, DANE_EE = 2, 3
USABLE_USAGES = (DANE_TA, DANE_EE)
SELECTORS = (0, 1)  # 0 full certificate, 1 SubjectPublicKeyInfo
MATCHING = (0, 1, 2)  # 0 exact, 1 SHA2-256, 2 SHA2-512

# What a TLSA lookup for one MX host found.
DANE = "dane"  # secure, usable records: DANE authentication
DANE_ENCRYPT = "encrypt"  # secure records, none usable: TLS without authentication
NO_DANE = "none"  # insecure or no TLSA
DANE_ERROR = "error"  # lookup failed under a secure MX: the host is not used now


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in USABLE_USAGES and self.selector in SELECTORS and self.mtype in MATCHING

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class HostDane:
    """The DANE state of one MX host: ``status`` (DANE, DANE_ENCRYPT, NO_DANE, DANE_ERROR)."""

    host: str
    status: str
    records: tuple[Tlsa, ...] = ()
    detail: str = ""


# --- matching (RFC 7671, RFC 6698 2.1) ----------------------------------------------------------


def _selected(cert_der: bytes, selector: int) -> bytes:
    if selector == 0:
        return cert_der
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_der_x509_certificate(cert_der).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: Tlsa, cert_der: bytes) -> bool:
    """Does ``cert_der`` match ``record`` (its selector and matching type)?"""
    try:
        return _digest(_selected(cert_der, record.selector), record.mtype) == record.data
    except ValueError:
        return False  # a certificate we cannot parse matches nothing


def match_chain(records: tuple[Tlsa, ...], chain_der: list[bytes], host: str) -> str | None:
    """None if the peer's chain (leaf first) is authenticated by a usable record; else why not.

    DANE-EE: the leaf matches.  DANE-TA: a certificate above the leaf matches, and the chain
    from the leaf to it verifies for ``host`` (that certificate as the only trust anchor)."""
    if not chain_der:
        return "no certificate"
    usable = [r for r in records if r.usable]
    if not usable:
        return "no usable TLSA record"
    leaf, above = chain_der[0], chain_der[1:]
    if any(r.usage == DANE_EE and record_matches(r, leaf) for r in usable):
        return None
    anchors = [c for c in above if any(r.usage == DANE_TA and record_matches(r, c) for r in usable)]
    for anchor in anchors:
        problem = _verify_to_anchor(leaf, above, anchor, host)
        if problem is None:
            return None
    if anchors:
        return f"DANE-TA chain not valid for {host}"
    return "no TLSA record matches the certificate chain"


def _verify_to_anchor(leaf: bytes, above: list[bytes], anchor: bytes, host: str) -> str | None:
    import datetime as dt

    from cryptography import x509
    from cryptography.x509 import verification

    try:
        store = verification.Store([x509.load_der_x509_certificate(anchor)])
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(dt.datetime.now(dt.UTC))
            .build_server_verifier(x509.DNSName(host.rstrip(".").lower()))
        )
        verifier.verify(
            x509.load_der_x509_certificate(leaf),
            [x509.load_der_x509_certificate(c) for c in above],
        )
    except (verification.VerificationError, ValueError) as exc:
        return str(exc)
    return None


# --- lookups ------------------------------------------------------------------------------------


class DaneResolver:
    """DANE's questions to the relay's :class:`~gateway.dns.Resolver` (which asks with DO and
    AD, caches by TTL and shares lookups in flight)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def mx_secure(self, domain: str) -> bool:
        """Is the domain's MX RRset (or the implicit MX) DNSSEC-secure (RFC 7672 2.2.1)?"""
        hosts = await self.resolver.mail_hosts(domain)
        return hosts.status == "ok" and bool(getattr(hosts, "secure", False))

    async def host(self, host: str, port: int = 25) -> HostDane:
        """The TLSA state of one MX host (``_port._tcp.host``), RFC 7672 2.2."""
        addresses = await self.resolver.addresses(host)
        if addresses.ok and not addresses.secure:
            return HostDane(host, NO_DANE, detail="address records not DNSSEC-secure")
        answer = await self.resolver.query(f"_{port}._tcp.{host}", "TLSA")
        if answer.status == "tempfail":
            detail = f"TLSA lookup for _{port}._tcp.{host} failed: {answer.rcode} {answer.detail}"
            return HostDane(host, DANE_ERROR, detail=detail.strip())
        if answer.status != "ok" or not answer.secure:
            return HostDane(host, NO_DANE, detail="no DNSSEC-secure TLSA records")
        records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer.records)
        if not any(r.usable for r in records):
            return HostDane(host, DANE_ENCRYPT, records, "no usable TLSA record")
        return HostDane(host, DANE, records)
