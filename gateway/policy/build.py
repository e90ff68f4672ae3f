"""Which rules make up the chain, in which order, for this gateway's role."""

from __future__ import annotations

from typing import TypeVar

from gateway.config import Config
from gateway.delivery.probe import SessionProber
from gateway.policy.chain import Chain, Rule
from gateway.policy.rules.recipient import RecipientRule
from gateway.policy.rules.relay_control import RelayControlRule
from gateway.policy.rules.route import RouteRule
from gateway.policy.rules.sender_binding import FromBindingRule, SenderBindingRule
from gateway.policy.rules.sender_domain import SenderDomainRule
from gateway.policy.rules.spam import SpamRule
from gateway.policy.rules.tls_known_failure import TlsKnownFailureRule
from gateway.policy.rules.tls_reachability import TlsReachabilityRule
from gateway.policy.rules.verdict import VerdictRule
from gateway.policy.rules.virus import VirusRule
from gateway.services import Services
from gateway.tenants import TenantTable

_Client = TypeVar("_Client")


def build_chain(config: Config, services: Services, *, relay_control: bool = True) -> Chain:
    """The one place that orders the rules.  MAIL stage, RCPT stage, then DATA stage; within
    the DATA stage: virus, spam, then route, which always decides.

    ``relay_control=False``: the intake refuses clients outside ``gateway.client_networks``
    when they connect (``gateway.intake.handler``), so the relay's chain does not ask again;
    ``smg explain`` keeps the rule to show the verdict."""
    rules: list[Rule] = []
    # MAIL stage: relay control first (a stranger learns nothing about DNS), then the sender.
    tenants = TenantTable.from_config(config) if config.tenants else None
    if relay_control:
        rules.append(RelayControlRule(config.gateway.client_networks, tenants))
    if tenants:  # the customer's own domains only (issue 11), before any DNS lookup
        rules.append(SenderBindingRule(tenants))
    rules.append(SenderDomainRule(services.resolver))
    # RCPT stage: syntax, relay tricks and the recipient limit before any other RCPT rule.
    rules.append(RecipientRule(config.gateway.max_recipients))
    if services.tls_policy is not None:  # a reject rule and a recent TLS failure: 550 5.7.10
        rules.append(TlsKnownFailureRule(services.tls_policy))
        if config.tls_policy.session_probe and services.resolver is not None:
            # a reject rule: is the destination reachable with its TLS?  (cache, else a probe)
            prober = SessionProber(config, services.resolver, services.tls_policy.dane)
            rules.append(TlsReachabilityRule(services.tls_policy, prober))
    # DATA stage: virus first (nothing infected goes further), the verdict header (trusted
    # only from good gateways, always removed), spam (good gateways: the bad one trusts the
    # verdict), then route, which always decides.
    if tenants:  # From: in the customer's own domains, before any scanner
        rules.append(FromBindingRule(tenants))
    if config.virus.enabled:
        rules.append(VirusRule(_client(services.clamd, "virus")))
    rules.append(VerdictRule(config.routing, config.gateway.role))
    if config.gateway.role == "good" and config.spam.enabled:
        rules.append(SpamRule(_client(services.rspamd, "spam"), config.spam))
    rules.append(RouteRule(config.gateway.role))
    return Chain(rules)


def _client(client: _Client | None, section: str) -> _Client:
    """A scanner client ``build_services`` made; never silently skip a scan that is on."""
    if client is None:
        raise ValueError(f"[{section}] is enabled but the services have no client for it")
    return client
