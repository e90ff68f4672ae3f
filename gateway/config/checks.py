"""Checks across keys: run by the loader once every key of a file parsed.

They see a whole :class:`Config` and report what single values cannot show: an open relay, a good
gateway with nowhere to send spam, conflicting forced-TLS rules, a blacklist notification without
a way to send it.  They depend only on the schema and on :mod:`gateway.domains`, so the config
never imports the features it configures.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gateway.config.bounds import (
    WIDEST_PREFIX,
    is_loopback_host,
    message_size_problem,
    too_wide,
)
from gateway.config.errors import ConfigProblem
from gateway.config.schema import Config
from gateway.config.tenancy import check_tenants
from gateway.domains import normalize_pattern, pattern_problem


def _check_gateway_limits(config: Config) -> list[ConfigProblem]:
    gateway = config.gateway
    problems = []
    size_problem = message_size_problem(gateway.max_message_size)
    if size_problem:
        problems.append(ConfigProblem("gateway.max_message_size", size_problem))
    if gateway.data_memory < gateway.max_message_size:
        problems.append(
            ConfigProblem(
                "gateway.data_memory",
                f"must be at least gateway.max_message_size ({gateway.max_message_size} bytes):"
                " a message of the largest size must fit in the memory budget",
            )
        )
    for index, network in enumerate(gateway.client_networks):
        if too_wide(network):
            problems.append(
                ConfigProblem(
                    f"gateway.client_networks[{index}]",
                    f"{network} is too wide (at most /{WIDEST_PREFIX[network.version]}): "
                    "this gateway would be an open relay",
                )
            )
    for index, network in enumerate(config.dns.extra_public_networks):
        if too_wide(network):
            problems.append(
                ConfigProblem(
                    f"dns.extra_public_networks[{index}]",
                    f"{network} is too wide (at most /{WIDEST_PREFIX[network.version]}): "
                    "it would turn the check for internal addresses off",
                )
            )
    return problems


def _check_exposure(config: Config) -> list[ConfigProblem]:
    """The metrics endpoint has no authentication: loopback only unless said otherwise; and a
    listener that demands STARTTLS must be able to offer it."""
    gateway = config.gateway
    problems = []
    metrics = gateway.metrics_listen
    if metrics is not None and not gateway.metrics_public and not is_loopback_host(metrics[0]):
        problems.append(
            ConfigProblem(
                "gateway.metrics_listen",
                f"{metrics[0]} is not a loopback address: the metrics have no authentication; "
                "set gateway.metrics_public = true to serve them there anyway",
            )
        )
    if gateway.require_tls_from_clients and gateway.tls_cert is None:
        problems.append(
            ConfigProblem(
                "gateway.require_tls_from_clients",
                "needs tls_cert and tls_key: without them no client could send",
            )
        )
    return problems


def _check_retries(config: Config) -> list[ConfigProblem]:
    delivery = config.delivery
    if delivery.retry_initial > delivery.retry_max:
        return [ConfigProblem("delivery.retry_initial", "must not be longer than retry_max")]
    return []


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
    return problems


# Run in this order once every key parsed; each returns its problems (none: fine).  A fixed
# tuple: a feature registering its own check here would make the config depend on importing it.
CROSS_CHECKS: tuple[Callable[[Config], list[ConfigProblem]], ...] = (
    _check_gateway_limits,
    _check_exposure,
    _check_retries,
    _check_routing,
    _check_tls_listener,
    _check_dkim_keys,
    _check_tls_rules,
    _check_blacklist,
    check_tenants,
)


# --- warnings: allowed, but probably not meant -----------------------------------------------


def _warn_rules_over_mta_sts(config: Config) -> list[ConfigProblem]:
    """A forced-TLS rule applies before MTA-STS (gateway.tls.policy): a rule for every
    recipient domain (``*``, or a whole top-level domain such as ``.com``) replaces the
    ``enforce`` policy a domain publishes (verified TLS to the MX hosts it names) by the rule's
    level, which for ``encrypt`` accepts any certificate."""
    if not config.mta_sts.enabled:
        return []
    warnings = []
    for index, rule in enumerate(config.tls_policy.rules):
        recipient = normalize_pattern(rule.recipient)
        if recipient != "*" and not (recipient.startswith(".") and recipient.count(".") == 1):
            continue
        senders = "every sender" if normalize_pattern(rule.sender) == "*" else rule.sender
        warnings.append(
            ConfigProblem(
                f"tls_policy.rules[{index}]",
                f"recipient {rule.recipient!r} (from {senders}) shadows MTA-STS: domains with "
                f"an MTA-STS 'enforce' policy get this rule's level {rule.level!r} instead of "
                "verified TLS to the MX hosts their policy names",
            )
        )
    return warnings


# Run on a valid config; what they find is printed by `smg config validate` (exit 0 all the
# same) and logged by the relay at start and reload.
WARNING_CHECKS: tuple[Callable[[Config], list[ConfigProblem]], ...] = (_warn_rules_over_mta_sts,)


def config_warnings(config: Config) -> list[ConfigProblem]:
    """What in a valid config is allowed but probably not meant."""
    return [warning for check in WARNING_CHECKS for warning in check(config)]
