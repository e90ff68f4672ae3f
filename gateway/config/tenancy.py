"""The customers (tenants) of a good gateway: ``[tenant_defaults]`` and ``[[tenants]]``.

A tenant is one customer: the networks its hosts send from, the AUTH users it may log in as
instead, the sender domains it owns (``.domain``: every subdomain), its DKIM keys and forced-TLS
rules (only for domains it owns) and its limits (``limits`` overrides ``[tenant_defaults]``).
The checks here refuse what would let one customer act as another: overlapping networks, a
domain owned twice, a key or rule for a domain the customer does not own, one AUTH user in two
customers.  Each problem names the key (``tenants[1].dkim[0].domain``) and the customer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gateway.config.bounds import WIDEST_PREFIX, duration, finite_float, too_wide, whole
from gateway.config.errors import ConfigProblem, InvalidValue
from gateway.config.values import parse_domain, parse_size
from gateway.domains import normalize_pattern, pattern_problem
from gateway.passwords import BadHash, parse_hash

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")


def _parsed(parse: Any, default: Any = None) -> Any:
    """A field parsed by ``parse``; the default written as in TOML and parsed once."""
    value = default if default is None else parse(default)
    return field(default=value, metadata={"parse": parse})


def parse_tenant_name(value: Any) -> str:
    if isinstance(value, str) and _NAME.fullmatch(value):
        return value
    raise InvalidValue(
        f"expected a name of a-z, 0-9 and '-' (1-64 characters, no '-' at the ends), got {value!r}"
    )


def parse_owned_domain(value: Any) -> str:
    """``example.com`` (that domain) or ``.example.com`` (every domain below it)."""
    if isinstance(value, str) and value.strip().startswith("."):
        return "." + parse_domain(value.strip()[1:])
    return parse_domain(value)


def parse_password_hash(value: Any) -> str:
    try:
        parse_hash(value)
    except BadHash as exc:
        raise InvalidValue(str(exc)) from None
    return str(value).strip()


def parse_user(value: Any) -> str:
    if isinstance(value, str) and value.strip() and value.isprintable() and " " not in value:
        return value.strip()
    raise InvalidValue(f"expected a user name without spaces, got {value!r}")


_SIZES = 1, 10_000
_HOURLY = 1, 100_000_000


@dataclass(frozen=True)
class TenantDefaults:
    """Limits and suspension thresholds of every tenant unless its ``limits`` say otherwise."""

    max_sessions: int = _parsed(whole(*_SIZES), 20)
    max_sessions_per_ip: int = _parsed(whole(*_SIZES), 10)
    messages_per_hour: int = _parsed(whole(*_HOURLY), 3600)
    recipients_per_hour: int = _parsed(whole(*_HOURLY), 10000)
    max_message_size: int = _parsed(parse_size, "25MiB")
    suspend_spam_share: float = _parsed(finite_float(0.01, 1), 0.5)
    suspend_min_messages: int = _parsed(whole(0, 1_000_000), 20)  # 0: never automatically
    suspend_reject_share: float = _parsed(finite_float(0.01, 1), 0.8)
    suspend_window: float = _parsed(duration("1d", low="1m"), "10m")


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's overrides; a key left out takes ``[tenant_defaults]``."""

    max_sessions: int | None = _parsed(whole(*_SIZES))
    max_sessions_per_ip: int | None = _parsed(whole(*_SIZES))
    messages_per_hour: int | None = _parsed(whole(*_HOURLY))
    recipients_per_hour: int | None = _parsed(whole(*_HOURLY))
    max_message_size: int | None = _parsed(parse_size)
    suspend_spam_share: float | None = _parsed(finite_float(0.01, 1))
    suspend_min_messages: int | None = _parsed(whole(0, 1_000_000))
    suspend_reject_share: float | None = _parsed(finite_float(0.01, 1))
    suspend_window: float | None = _parsed(duration("1d", low="1m"))


def effective_limits(defaults: TenantDefaults, limits: TenantLimits) -> TenantDefaults:
    """``defaults`` with the tenant's overrides applied."""
    changes = {k: v for k, v in vars(limits).items() if v is not None}
    return TenantDefaults(**{**vars(defaults), **changes})


@dataclass(frozen=True)
class TenantUser:
    user: str = _parsed(parse_user)
    password_hash: str = _parsed(parse_password_hash)


# --- ownership -------------------------------------------------------------------------------


def owns(domains: list[str], domain: str) -> bool:
    """Does a tenant with these ``domains`` (exact or ``.parent``) own ``domain``?"""
    name = domain.lower().rstrip(".")
    if name in domains:
        return True
    return any(d.startswith(".") and name.endswith(d) for d in domains)


def owns_pattern(domains: list[str], pattern: str) -> bool:
    """Does every domain ``pattern`` (a TLS rule's sender) matches belong to the tenant?"""
    if pattern == "*":
        return False
    if pattern.startswith("."):
        below = any(d.startswith(".") and pattern.endswith(d) for d in domains)
        return pattern in domains or below
    return owns(domains, pattern)


# --- checks ----------------------------------------------------------------------------------


def check_tenants(config: Any) -> list[ConfigProblem]:
    """Every tenant problem of ``config`` (a :class:`gateway.config.Config`)."""
    tenants = config.tenants
    problems: list[ConfigProblem] = []
    names: dict[str, int] = {}
    for index, tenant in enumerate(tenants):
        key = f"tenants[{index}]"
        if tenant.name in names:
            problems.append(ConfigProblem(f"{key}.name", f"customer {tenant.name!r} is also "
                                          f"tenants[{names[tenant.name]}]"))  # fmt: skip
        names.setdefault(tenant.name, index)
        problems += _check_one(config, tenant, key)
    problems += _check_overlaps(tenants)
    problems += _check_domains(tenants)
    problems += _check_users(tenants)
    problems += _check_auth_networks(config)
    return problems


def _check_one(config: Any, tenant: Any, key: str) -> list[ConfigProblem]:
    who = f"customer {tenant.name!r}"
    problems = []
    if not tenant.networks and not tenant.auth:
        problems.append(ConfigProblem(key, f"{who} has neither networks nor auth users: "
                                      "no host could send as it"))  # fmt: skip
    if not tenant.domains:
        problems.append(ConfigProblem(f"{key}.domains", f"{who} needs at least one domain"))
    if tenant.auth and config.gateway.tls_cert is None:
        problems.append(
            ConfigProblem(
                f"{key}.auth",
                f"{who} has auth users but the gateway "
                "has no tls_cert: AUTH is offered only after STARTTLS",
            )
        )
    for i, network in enumerate(tenant.networks):
        if too_wide(network):
            problems.append(
                ConfigProblem(
                    f"{key}.networks[{i}]",
                    f"{network} of {who} is too wide (at most /{WIDEST_PREFIX[network.version]})",
                )
            )
    for i, dkim in enumerate(tenant.dkim):
        if not owns(tenant.domains, dkim.domain):
            problems.append(
                ConfigProblem(f"{key}.dkim[{i}].domain", f"{who} does not own domain {dkim.domain}")
            )
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dkim.selector or ""):
            problems.append(
                ConfigProblem(
                    f"{key}.dkim[{i}].selector", f"invalid selector {dkim.selector!r} of {who}"
                )
            )
    for i, rule in enumerate(tenant.tls_rules):
        for side in ("sender", "recipient"):
            why = pattern_problem(getattr(rule, side))
            if why:
                problems.append(ConfigProblem(f"{key}.tls_rules[{i}].{side}", f"{who}: {why}"))
        sender = normalize_pattern(rule.sender) if not pattern_problem(rule.sender) else ""
        if sender and not owns_pattern(tenant.domains, sender):
            problems.append(
                ConfigProblem(
                    f"{key}.tls_rules[{i}].sender", f"{who} does not own domain {rule.sender}"
                )
            )
    size = tenant.limits.max_message_size
    if size is not None and size > config.gateway.max_message_size:
        problems.append(
            ConfigProblem(
                f"{key}.limits.max_message_size", f"{who}: more than gateway.max_message_size"
            )
        )
    return problems


def _check_overlaps(tenants: list[Any]) -> list[ConfigProblem]:
    """Networks of two customers that overlap: sorted by first address, each compared with the
    widest one still open (n log n for thousands of networks)."""
    spans = []
    for t_index, tenant in enumerate(tenants):
        for n_index, network in enumerate(tenant.networks):
            first = int(network.network_address)
            last = int(network.broadcast_address)
            spans.append((network.version, first, -last, t_index, n_index, network))
    spans.sort()
    problems = []
    open_span: tuple | None = None
    for span in spans:
        version, first, neg_last, t_index, n_index, network = span
        if open_span and open_span[0] == version and first <= -open_span[2]:
            if open_span[3] != t_index:
                other = tenants[open_span[3]]
                problems.append(ConfigProblem(
                    f"tenants[{t_index}].networks[{n_index}]",
                    f"{network} of customer {tenants[t_index].name!r} overlaps {open_span[5]} "
                    f"of customer {other.name!r}"))  # fmt: skip
            if -neg_last > -open_span[2]:
                open_span = span
        else:
            open_span = span
    return problems


def _check_domains(tenants: list[Any]) -> list[ConfigProblem]:
    """A domain two customers would own: the same entry, or one's ``.parent`` above the
    other's domain."""
    exact: dict[str, int] = {}
    below: dict[str, int] = {}  # ".parent" -> tenant index
    for t_index, tenant in enumerate(tenants):
        for d in tenant.domains:
            (below if d.startswith(".") else exact).setdefault(d, t_index)
    problems = []
    for t_index, tenant in enumerate(tenants):
        for d_index, domain in enumerate(tenant.domains):
            other = _other_owner(domain, t_index, exact, below)
            if other is not None:
                problems.append(ConfigProblem(
                    f"tenants[{t_index}].domains[{d_index}]",
                    f"domain {domain} of customer {tenant.name!r} is also owned by customer "
                    f"{tenants[other].name!r}"))  # fmt: skip
    return problems


def _other_owner(domain: str, me: int, exact: dict[str, int], below: dict[str, int]) -> int | None:
    table = below if domain.startswith(".") else exact
    if table.get(domain, me) != me:
        return table[domain]
    labels = domain.lstrip(".").split(".")
    for cut in range(1, len(labels)):
        parent = "." + ".".join(labels[cut:])
        if below.get(parent, me) != me:
            return below[parent]
    return None


def _check_users(tenants: list[Any]) -> list[ConfigProblem]:
    seen: dict[str, str] = {}
    problems = []
    for t_index, tenant in enumerate(tenants):
        for u_index, user in enumerate(tenant.auth):
            name = user.user.lower()
            if name in seen:
                problems.append(ConfigProblem(
                    f"tenants[{t_index}].auth[{u_index}].user",
                    f"user {user.user} of customer {tenant.name!r} is also a user of customer "
                    f"{seen[name]!r}"))  # fmt: skip
            seen.setdefault(name, tenant.name)
    return problems


def _check_auth_networks(config: Any) -> list[ConfigProblem]:
    problems = []
    for index, network in enumerate(config.gateway.auth_networks):
        if too_wide(network):
            problems.append(
                ConfigProblem(
                    f"gateway.auth_networks[{index}]",
                    f"{network} is too wide (at most /{WIDEST_PREFIX[network.version]})",
                )
            )
    if config.gateway.auth_networks and not any(t.auth for t in config.tenants):
        problems.append(
            ConfigProblem("gateway.auth_networks", "no tenant has auth users: nobody could log in")
        )
    return problems
