"""``smg tls probe``'s DANE lines and what the in-session check (``tls_reachability``) would
answer, kept apart from the probe's SMTP talk in :mod:`gateway.cli.tls`."""

from __future__ import annotations

from typing import Any

from gateway.config import Config
from gateway.delivery.probe import SessionProber
from gateway.dns import Resolver
from gateway.tls.dane import DANE, DaneResolver, match_chain
from gateway.tls.policy import TlsPolicy, TlsRequirement


async def dane_status(resolver: Resolver, domain: str, hosts: list[Any]) -> dict[str, Any]:
    """Is the MX RRset secure; per MX host its TLSA state and whether the chain seen matches."""
    dane = DaneResolver(resolver)
    status: dict[str, Any] = {"mx_secure": await dane.mx_secure(domain), "hosts": {}}
    if not status["mx_secure"]:
        return status
    for probe in hosts:
        found = await dane.host(probe.host, 25)
        entry = {"state": found.status, "records": [r.text() for r in found.records],
                 "detail": found.detail}  # fmt: skip
        chain = getattr(probe, "chain_der", None)
        if found.status == DANE and chain:
            entry["match"] = match_chain(found.records, chain, probe.host) or "matches"
        status["hosts"][f"{probe.host} {probe.address}"] = entry
    return status


async def in_session_answer(
    config: Config, resolver: Resolver, domain: str, sender_domain: str, timeout: float
) -> str:
    """What RCPT would get under the rule for (sender domain, domain): a fresh probe."""
    policy = TlsPolicy(config, resolver)
    rule = policy.rule_for(sender_domain, domain)
    if rule is None or rule.on_failure != "reject":
        return "no in-session check (no reject rule for this sender and domain)"
    if not config.tls_policy.session_probe:
        return "no in-session check (tls_policy.session_probe = false)"
    requirement = TlsRequirement(rule.level, rule.on_failure, rule.name, (), policy.ca_bundle)
    timeout = min(timeout, config.tls_policy.session_probe_timeout)
    result = await SessionProber(config, resolver, policy.dane).probe(domain, requirement, timeout)
    if result.ok:
        return f"accepted: {result.reason} ({result.relay or 'no TLS question'})"
    code = "450 4.7.10" if result.temporary else "550 5.7.10"
    return f"{code}: {result.reason}"


def render(status: dict[str, Any], answer: str) -> list[str]:
    lines = [f"  DNSSEC: MX records {'secure' if status['mx_secure'] else 'not secure: no DANE'}"]
    for where, entry in status["hosts"].items():
        text = f"  DANE {where}: {entry['state']}"
        if entry["records"]:
            text += f" TLSA {'; '.join(entry['records'])}"
        if entry.get("match"):
            text += f" -> {entry['match']}"
        elif entry["detail"]:
            text += f" ({entry['detail']})"
        lines.append(text)
    lines.append(f"  in-session check: {answer}")
    return lines
