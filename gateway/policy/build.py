"""Which rules make up the chain, in which order, for this gateway's role."""

from __future__ import annotations

from gateway.config import Config
from gateway.policy.chain import Chain, Rule
from gateway.services import Services


def build_chain(config: Config, services: Services) -> Chain:
    """The one place that orders the rules.  MAIL stage, RCPT stage, then DATA stage; within
    the DATA stage: virus, spam, then route, which always decides."""
    rules: list[Rule] = []
    # Each feature appends its rules here, e.g.:
    #   rules.append(SenderDomainRule(services.resolver, config.dns))
    return Chain(rules)
