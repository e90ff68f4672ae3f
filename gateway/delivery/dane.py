"""DANE (RFC 7672) in delivery: does it apply to a domain, and what does each MX host need?

Shared by the router and the in-session probe, so both decide alike.  The lookups and the
matching: :mod:`gateway.tls.dane`.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.tls.dane import DANE as DANE_HOST
from gateway.tls.dane import DANE_ENCRYPT, DANE_ERROR, DaneResolver
from gateway.tls.levels import DANE, ENCRYPT, VERIFY
from gateway.tls.policy import TlsRequirement


async def dane_applies(
    resolver: DaneResolver | None, domain: str, requirement: TlsRequirement
) -> bool:
    """DANE is looked at for this domain: on (``tls_policy.dane``, or a rule of level dane),
    not a PKIX ``verify`` rule (its customer asked for that), and the MX RRset secure."""
    if resolver is None or requirement.level == VERIFY:
        return False
    return await resolver.mx_secure(domain)


async def host_requirement(
    resolver: DaneResolver, host: str, requirement: TlsRequirement
) -> tuple[TlsRequirement, str, bool]:
    """The requirement for one MX host of a domain where DANE applies, or why the host is not
    used now ("", else the reason, with True for a TLS problem, False for a temporary one).

    The TLSA records are always those of ``_25._tcp.<host>`` (RFC 7672 2.2: SMTP to an MX is
    port 25), also where ``delivery.port`` differs (tests, the lab)."""
    found = await resolver.host(host, 25)
    if found.status == DANE_ERROR:  # never strip DANE because a lookup failed: later
        return requirement, f"{host}: {found.detail}", False
    if found.status == DANE_HOST:
        return replace(requirement, level=DANE, tlsa=found.records), "", False
    if requirement.level == DANE:  # a dane rule: no TLSA, no delivery to that host
        return requirement, f"{host}: DANE required: {found.detail}", True
    if found.status == DANE_ENCRYPT and not requirement.requires_tls:
        return replace(requirement, level=ENCRYPT), "", False  # RFC 7672 2.2: TLS, unverified
    return requirement, "", False
