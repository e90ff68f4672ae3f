"""Verdict rule (DATA stage, every gateway): the spam verdict header between gateways.

A good gateway that reroutes spam adds one header (``routing.verdict_header``, default
``X-SMG-Verdict``) with its verdict, e.g.::

    X-SMG-Verdict: spam; score=15.2; required=15; action=reject; by=mta01.example.net;
        tenant=customer-a; symbols=GTUBE:15, MISSING_DATE:1, ...

On the bad gateway this rule trusts that header only when the SMTP peer is one of
``routing.good_gateways``; then the verdict goes into ``ctx.facts["spam"]`` (so an NDR written
there can say why the mail was classified as spam) and the bad gateway does not ask rspamd
again; ``tenant=`` (the customer that sent it, issue 11; absent for untenanted mail) becomes
the message's tenant there (queue, logs, metrics).  On every gateway, and whoever sent it,
the header is marked for removal: a copy from an untrusted peer must never influence
anything, and the trusted copy must not leave the fleet.
"""

from __future__ import annotations

import ipaddress
import re

from gateway.config import RoutingSection
from gateway.dns import unmapped
from gateway.policy import headers
from gateway.policy.chain import MessageContext, RuleResult, Stage
from gateway.policy.rules.spam import SpamVerdict, describe

_ACTION = re.compile(r"^[a-z][a-z ]{0,30}$")
_SYMBOL = re.compile(r"^([A-Za-z0-9_.\-]{1,64}):(-?\d+(?:\.\d+)?)$")
_HOST = re.compile(r"^[A-Za-z0-9.\-]{1,253}$")
_TENANT = re.compile(r"^[a-z0-9-]{1,64}$")


def format_verdict(verdict: SpamVerdict, by: str, tenant: str | None = None) -> str:
    """The header value for ``verdict``; the inverse of :func:`parse_verdict`."""
    kind = "spam" if verdict["is_spam"] else "ham"
    symbols = ", ".join(f"{name}:{score:g}" for name, score in verdict["symbols"].items())
    customer = f"tenant={tenant}; " if tenant else ""
    return (
        f"{kind}; score={verdict['score']:g}; required={verdict['required']:g}; "
        f"action={verdict['action']}; by={by}; {customer}symbols={symbols}"
    )


def parse_verdict(value: str) -> tuple[SpamVerdict, str] | None:
    """(verdict, the gateway that wrote it) from a header value, or None if malformed.
    A ``tenant`` tag is in ``verdict["tenant"]`` (see :func:`verdict_tenant`)."""
    kind, *pairs = [part.strip() for part in value.split(";")]
    if kind not in ("spam", "ham"):
        return None
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or key.strip() in tags:
            return None
        tags[key.strip()] = val.strip()
    tenant = tags.pop("tenant", None)
    if set(tags) != {"score", "required", "action", "by", "symbols"}:
        return None
    if tenant is not None and not _TENANT.match(tenant):
        return None
    try:
        score, required = float(tags["score"]), float(tags["required"])
    except ValueError:
        return None
    if not _ACTION.match(tags["action"]) or not _HOST.match(tags["by"]):
        return None
    symbols: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in tags["symbols"].split(","))):
        match = _SYMBOL.match(item)
        if not match:
            return None
        symbols[match.group(1)] = float(match.group(2))
    verdict = SpamVerdict(
        is_spam=kind == "spam",
        score=score,
        required=required,
        action=tags["action"],
        symbols=symbols,
        source="",
    )
    if tenant:
        verdict["tenant"] = tenant
    return verdict, tags["by"]


def _same_ip(a: str, b: str) -> bool:
    try:
        first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    return unmapped(first) == second


class VerdictRule:
    name = "verdict"
    stage = Stage.DATA

    def __init__(self, routing: RoutingSection, role: str) -> None:
        self.header = routing.verdict_header
        self.good_gateways = list(routing.good_gateways)
        self.role = role

    def trusts(self, client_ip: str) -> bool:
        return self.role == "bad" and any(_same_ip(client_ip, g) for g in self.good_gateways)

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        values = headers.get_values(ctx.data, self.header)
        # Whatever happens below, no received copy of the header is queued.
        ctx.remove_headers.add(self.header.lower())
        if not values:
            return RuleResult(self.name, f"no {self.header} header")
        if not self.trusts(ctx.client_ip):
            why = "this is a good gateway" if self.role == "good" else "peer not a good gateway"
            return RuleResult(
                self.name,
                f"{self.header} from {ctx.client_ip} ignored and removed ({why})",
                details={"trusted": False},
            )
        parsed = parse_verdict(values[0]) if len(values) == 1 else None
        if parsed is None:
            return RuleResult(
                self.name,
                f"{self.header} from good gateway {ctx.client_ip} malformed or repeated: ignored",
                details={"trusted": False},
            )
        verdict, by = parsed
        verdict["source"] = f"verdict header from {by} ({ctx.client_ip})"
        ctx.facts["spam"] = verdict
        ctx.tenant = verdict.get("tenant") or ctx.tenant
        return RuleResult(
            self.name,
            f"trusted verdict from good gateway {by} ({ctx.client_ip}): {describe(verdict)}",
            details={"trusted": True, **verdict},
        )
