"""The forced-TLS rules of ``tls_policy.rules``, compiled and ranked.

The service keys forced TLS on the sender domain and the recipient domain together: a rule has
a sender pattern and a recipient pattern (the syntax: :mod:`gateway.domains`).

Precedence (docs/tls.md): the most specific rule wins.  A pattern ranks exact > subdomain > ``*``;
among subdomain patterns the longer suffix (more labels) ranks higher.  Rules are compared by
the recipient pattern's rank first, then the sender pattern's rank.  Two patterns that match the
same domain always have different ranks, and two rules with the same pair of patterns are a
configuration error (:mod:`gateway.config.checks`), so exactly one rule wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import TlsRule
from gateway.domains import normalize_pattern, pattern_matches, pattern_rank


@dataclass(frozen=True)
class CompiledRule:
    index: int  # position in tls_policy.rules, for messages
    sender: str
    recipient: str
    level: str
    on_failure: str

    @property
    def rank(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (pattern_rank(self.recipient), pattern_rank(self.sender))

    @property
    def name(self) -> str:
        return f"tls_policy.rules[{self.index}] sender={self.sender} recipient={self.recipient}"

    def matches(self, sender_domain: str, recipient_domain: str) -> bool:
        return pattern_matches(self.sender, sender_domain) and pattern_matches(
            self.recipient, recipient_domain
        )


def compile_rules(rules: list[TlsRule]) -> list[CompiledRule]:
    """Normalized rules, most specific first (so the first match wins)."""
    compiled = [
        CompiledRule(
            index,
            normalize_pattern(rule.sender),
            normalize_pattern(rule.recipient),
            rule.level,
            rule.on_failure,
        )
        for index, rule in enumerate(rules)
    ]
    return sorted(compiled, key=lambda rule: rule.rank, reverse=True)
