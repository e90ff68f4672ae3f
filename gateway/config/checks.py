"""Checks across keys: run by the loader once every key of a file parsed.

They see a whole :class:`Config` and report what single values cannot show: an open relay, a good
gateway with nowhere to send spam, conflicting forced-TLS rules, a blacklist notification without
a way to send it.  They depend only on the schema and on :mod:`gateway.domains`, so the config
never imports the features it configures.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gateway.config.errors import ConfigProblem
from gateway.config.schema import Config
from gateway.domains import normalize_pattern, pattern_problem


def _check_gateway_limits(config: Config) -> list[ConfigProblem]:
    gateway = config.gateway
    problems = []
    if gateway.max_message_size < 1024:
        problems.append(
            ConfigProblem("gateway.max_message_size", "must be at least 1KiB (1024 bytes)")
        )
    if gateway.data_memory < gateway.max_message_size:
        problems.append(
            ConfigProblem(
                "gateway.data_memory",
                f"must be at least gateway.max_message_size ({gateway.max_message_size} bytes):"
                " a message of the largest size must fit in the memory budget",
            )
        )
    for index, network in enumerate(gateway.client_networks):
        if network.prefixlen < (8 if network.version == 4 else 16):
            problems.append(
                ConfigProblem(
                    f"gateway.client_networks[{index}]",
                    f"{network} is too wide: this gateway would be an open relay",
                )
            )
    return problems


def _check_routing(config: Config) -> list[ConfigProblem]:
    if config.gateway.role == "good" and config.spam.enabled and not config.routing.bad_gateways:
        return [
            ConfigProblem(
                "routing.bad_gateways",
                "a good gateway with the spam check on needs at least one bad "
                "gateway to reroute spam to",
            )
        ]
    return []


def _check_tls_listener(config: Config) -> list[ConfigProblem]:
    cert, key = config.gateway.tls_cert, config.gateway.tls_key
    if (cert is None) != (key is None):
        return [ConfigProblem("gateway.tls_cert", "tls_cert and tls_key go together")]
    return []


def _check_dkim_keys(config: Config) -> list[ConfigProblem]:
    seen: set[tuple[str, str]] = set()
    problems = []
    for index, key in enumerate(config.dkim.keys):
        if not key.selector or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key.selector):
            problems.append(
                ConfigProblem(f"dkim.keys[{index}].selector", f"invalid selector {key.selector!r}")
            )
        if (key.domain, key.selector) in seen:
            problems.append(
                ConfigProblem(
                    f"dkim.keys[{index}]", f"{key.selector}._domainkey.{key.domain} twice"
                )
            )
        seen.add((key.domain, key.selector))
    return problems


def _check_tls_rules(config: Config) -> list[ConfigProblem]:
    """Valid patterns, and no two rules for the same pair of patterns (which one applies would
    be ambiguous: the policy's precedence ranks patterns, not rules)."""
    problems: list[ConfigProblem] = []
    seen: dict[tuple[str, str], int] = {}
    for index, rule in enumerate(config.tls_policy.rules):
        bad = False
        for key in ("sender", "recipient"):
            why = pattern_problem(getattr(rule, key))
            if why:
                problems.append(ConfigProblem(f"tls_policy.rules[{index}].{key}", why))
                bad = True
        if bad:
            continue
        pair = (normalize_pattern(rule.sender), normalize_pattern(rule.recipient))
        if pair in seen:
            problems.append(
                ConfigProblem(
                    f"tls_policy.rules[{index}]",
                    f"same sender {pair[0]!r} and recipient {pair[1]!r} as "
                    f"tls_policy.rules[{seen[pair]}]: which one applies would be ambiguous",
                )
            )
        seen.setdefault(pair, index)
    return problems


def _check_blacklist(config: Config) -> list[ConfigProblem]:
    section = config.blacklist
    problems: list[ConfigProblem] = []

    def problem(key: str, message: str) -> None:
        problems.append(ConfigProblem(f"blacklist.{key}", message))

    if (section.operations_mailbox is None) != (section.notify_via is None):
        problem("notify_via", "operations_mailbox and notify_via go together")
    seen_zones: set[str] = set()
    for index, entry in enumerate(section.zones):
        if entry.zone in seen_zones:
            problem(f"zones[{index}].zone", f"{entry.zone} is configured twice")
        seen_zones.add(entry.zone)
        if entry.removal_mail and section.notify_via is None:
            problem(f"zones[{index}].removal_mail", "a removal mail needs notify_via to be sent")
    if len(set(section.addresses)) != len(section.addresses):
        problem("addresses", "an address is listed twice")
    if not section.ticket_id_field.strip():
        problem("ticket_id_field", "must name the key of the ticket id in the reply")
    if section.notify_attempts < 1:
        problem("notify_attempts", "must be at least 1")
    return problems


# Run in this order once every key parsed; each returns its problems (none: fine).  A fixed
# tuple: a feature registering its own check here would make the config depend on importing it.
CROSS_CHECKS: tuple[Callable[[Config], list[ConfigProblem]], ...] = (
    _check_gateway_limits,
    _check_routing,
    _check_tls_listener,
    _check_dkim_keys,
    _check_tls_rules,
    _check_blacklist,
)
