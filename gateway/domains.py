"""Domain names and the domain patterns of forced-TLS rules; depends on nothing in the relay.

A pattern (``tls_policy.rules[].sender`` / ``.recipient``, docs/tls.md) is

- an exact domain (``example.com``: that domain only),
- a subdomain pattern (``.example.com``: every domain below example.com, NOT example.com itself,
  as in Postfix's tables), or
- ``*`` (any domain, including the null sender's empty domain).

The config's checks (:mod:`gateway.config.checks`) validate patterns with :func:`pattern_problem`
and the TLS policy (:mod:`gateway.tls.rules`) ranks and matches them, so both read the same
syntax without the config depending on the TLS code.
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form without a trailing dot; "" stays "" (the null sender)."""
    name = domain.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii") if name else ""
    except UnicodeError:
        return name


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid rule pattern, or None if it is."""
    if pattern == "*":
        return None
    if not isinstance(pattern, str) or not pattern.strip():
        return 'expected a domain, ".domain" (its subdomains) or "*", got an empty pattern'
    body = pattern.strip().lower()
    subdomains = body.startswith(".")
    labels = (body[1:] if subdomains else body).rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels):
        return f'not a domain, ".domain" or "*": {pattern!r}'
    if not subdomains and len(labels) < 2:
        return f"an exact domain needs at least two labels: {pattern!r} (use .{body} for all below)"
    return None


def pattern_rank(pattern: str) -> tuple[int, int]:
    """How specific a pattern is: exact (2, labels) > subdomain (1, labels) > ``*`` (0, 0)."""
    if pattern == "*":
        return (0, 0)
    if pattern.startswith("."):
        return (1, pattern.count("."))
    return (2, pattern.count(".") + 1)


def pattern_matches(pattern: str, domain: str) -> bool:
    """Does a (normalized) rule pattern match a (normalized) domain?"""
    if pattern == "*":
        return True
    if pattern.startswith("."):
        return domain.endswith(pattern) and len(domain) > len(pattern)
    return domain == pattern


def normalize_pattern(pattern: str) -> str:
    text = pattern.strip().lower()
    if text == "*":
        return text
    if text.startswith("."):
        return "." + normalize_domain(text[1:])
    return normalize_domain(text)
