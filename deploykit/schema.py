"""The inventory's keys: how each value is read, its default, whether it is set per host.

docs/deploy.md documents every key.  The parsers are the relay's own (``gateway.config``), plus
the checks an inventory needs beyond them (placeholders, time zones, systemd calendars).
"""

from __future__ import annotations

import copy
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.problems import InvalidValue
from gateway.config import (
    parse_domain,
    parse_email,
    parse_host_port,
    parse_ip,
    parse_network,
    parse_size,
    parse_url,
)

ROLES = ("good", "bad")
PLACEHOLDER = re.compile(r"REPLACE[-_ ]?ME", re.IGNORECASE)


def _not_placeholder(value: Any) -> Any:
    if isinstance(value, str) and PLACEHOLDER.search(value):
        raise InvalidValue(f"{value!r} is a placeholder: set the real value")
    if isinstance(value, list) and any(isinstance(v, str) and PLACEHOLDER.search(v) for v in value):
        raise InvalidValue(f"{value!r} holds a placeholder: set the real values")
    return value


def _ip(value: Any) -> str:
    _not_placeholder(value)
    return parse_ip(value)


def _networks(value: Any) -> list[str]:
    _not_placeholder(value)
    if not isinstance(value, list):
        raise InvalidValue(f"expected a list of networks such as ['10.0.0.0/8'], got {value!r}")
    return [str(_item(parse_network, item, index)) for index, item in enumerate(value)]


def _item(parse: Callable[[Any], Any], item: Any, index: int) -> Any:
    try:
        return parse(item)
    except ValueError as exc:
        raise InvalidValue(f"[{index}]: {exc}") from None


def _trust_anchors(value: Any) -> list[str]:
    """DNSKEY or DS record lines (``zone. DNSKEY 257 3 13 ...``) for unbound's trust-anchor."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidValue(f"expected a list of DNSKEY/DS record lines, got {value!r}")
    for index, line in enumerate(value):
        fields = line.split()
        if len(fields) < 5 or fields[1].upper() not in ("DNSKEY", "DS") or '"' in line:
            raise InvalidValue(f"[{index}]: not a 'zone. DNSKEY ...' or 'zone. DS ...' line")
    return list(value)


def _ips(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise InvalidValue(f"expected a list of IP addresses, got {value!r}")
    return [_item(parse_ip, item, index) for index, item in enumerate(value)]


def _domain(value: Any) -> str:
    _not_placeholder(value)
    return parse_domain(value)


def _url(value: Any) -> str:
    _not_placeholder(value)
    return parse_url(value)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else parse(value)


def _path(value: Any) -> str:
    _not_placeholder(value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"expected a file path, got {value!r}")
    return value


def _timezone(value: Any) -> str:
    try:
        zoneinfo.ZoneInfo(str(value))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidValue(f"not a known time zone: {value!r} (e.g. Europe/Berlin)") from None
    return str(value)


def _calendar(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9A-Za-z*:,./~ -]+", value.strip()):
        return value.strip()
    raise InvalidValue(
        f"expected a systemd OnCalendar expression such as '*-*-* 05:00:00': {value!r}"
    )


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidValue(f"expected True or False, got {value!r}")


def _seconds(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3600:
        return value
    raise InvalidValue(f"expected seconds (0-3600), got {value!r}")


def _port(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    raise InvalidValue(f"expected a TCP port (1-65535), got {value!r}")


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidValue(f"expected a list of host names, got {value!r}")
    return list(value)


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValue(f"expected a dict of relay config sections, got {value!r}")
    return value


def _entries(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidValue(f"expected a list, got {value!r}")
    return value


def _size(value: Any) -> Any:
    parse_size(value)
    return value


_PROM_DURATION = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|y))+")


def prometheus_duration(value: Any) -> str:
    """A Prometheus duration: ``30s``, ``5m``, ``1h30m``, ``30d``."""
    if isinstance(value, str) and _PROM_DURATION.fullmatch(value):
        return value
    raise InvalidValue(f"expected a Prometheus duration such as '30s', '5m' or '30d': {value!r}")


def alert_windows(value: Any) -> dict[str, str]:
    """``{alert name or "*": duration}``: the ``for:`` windows of the shipped alert rules to
    override (``"*"``: every rule); names are checked against the rules (deploykit.checks)."""
    if not isinstance(value, dict):
        raise InvalidValue(f"expected {{'SmgClamdUnavailable': '5m', '*': '1m'}}, got {value!r}")
    out = {}
    for name, window in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"\*|[A-Za-z][A-Za-z0-9_]*", name):
            raise InvalidValue(f"{name!r}: expected an alert name or '*'")
        try:
            out[name] = prometheus_duration(window)
        except InvalidValue as exc:
            raise InvalidValue(f"{name}: {exc}") from None
    return out


REQUIRED: Any = object()


@dataclass(frozen=True)
class Key:
    """One inventory key: how its value is read, its default, and whether it is per host."""

    parse: Callable[[Any], Any]
    default: Any = REQUIRED
    per_host: bool = False
    doc: str = ""

    def default_value(self) -> Any:
        """A fresh copy of the default: a host's list must not be another host's."""
        return copy.deepcopy(self.default)


# Every key an inventory may set (docs/deploy.md documents each).  pyinfra's own connection
# keys (``ssh_*``) and global arguments (``_sudo`` ...) pass through untouched.
KEYS: dict[str, Key] = {
    # per host
    "public_address": Key(_ip, per_host=True, doc="what SPF, PTR, DNSBLs and far ends see"),
    # Behind 1:1 NAT (a cloud's elastic IP) the host has a private address: the relay listens
    # and binds there; None: the same as public_address (no NAT).
    "listen_address": Key(_optional(_ip), None, per_host=True, doc="the relay listens here"),
    "source_address": Key(_optional(_ip), None, per_host=True, doc="the relay sends from here"),
    "fqdn": Key(_domain, per_host=True, doc="EHLO name, NDR sender domain, certificate name"),
    "tls_cert_file": Key(_path, per_host=True, doc="the host's certificate (control machine)"),
    "tls_key_file": Key(_path, per_host=True, doc="its private key (control machine)"),
    # packages and the operating system
    "debian_mirror": Key(_url, "http://deb.debian.org/debian"),
    "debian_security_mirror": Key(_url, "http://deb.debian.org/debian-security"),
    "apt_proxy": Key(_optional(_url), None),
    "timezone": Key(_timezone, "Europe/Berlin"),
    "resolvers": Key(_ips, []),
    # a validating unbound on each host (roles/resolver.py): DNSSEC for DANE (docs/tls.md)
    "local_resolver": Key(_bool, False),
    "resolver_stub": Key(_bool, False),  # the resolvers are authoritative servers (the lab)
    "dnssec_trust_anchors": Key(_trust_anchors, []),
    # networks
    # The old key: who may relay (no sender binding).  With ``tenants`` leave it empty: the
    # customer networks are then the union of the tenants' networks (docs/deploy.md).
    "customer_networks": Key(_networks, []),
    # customers (issue 11, docs/tenants.md): [[tenants]] and [tenant_defaults] of the good
    # gateways; auth_networks may connect without a tenant network and must AUTH.
    "tenants": Key(lambda v: tenants(v), []),
    "tenant_defaults": Key(_table, {}),
    "auth_networks": Key(_networks, []),
    "ssh_networks": Key(_networks),  # no default: SSH open to the world is never assumed
    "extra_public_networks": Key(_networks, []),
    # scanners
    "clamav_mirror": Key(_optional(_url), None),
    "clamav_signatures_dir": Key(_path, "tests/data/clamav"),
    # TLS
    "internal_ca_file": Key(_path),
    "public_ca_file": Key(_optional(_path), None),
    "tls_rules": Key(_entries, []),
    # DKIM
    "dkim_domains": Key(_entries, []),
    "dkim_keys_dir": Key(_path, "keys"),
    # Sign with a key whose TXT record is not visible yet (python -m deploykit dns-check):
    # only on purpose, e.g. a domain whose DNS the control machine cannot see.
    "dkim_unpublished_ok": Key(_bool, False),
    # DNS records of the fleet (python -m deploykit dns-check)
    "spf_domain": Key(_optional(_domain), None),
    # blacklist monitoring
    "operations_mailbox": Key(_optional(parse_email), None),
    "notify_via": Key(_optional(lambda v: parse_host_port(v, 25)), ("127.0.0.1", 25)),
    "ticket_url": Key(_optional(_url), None),
    "dnsbl_zones": Key(_entries, []),
    "blacklist_monitor_hosts": Key(_names, []),
    "blacklist_schedule": Key(_calendar, "*-*-* 05:00:00"),
    "blacklist_timezone": Key(_timezone, "Europe/Berlin"),
    # The head start of each monitor host over the next one (leader with fallback).
    "blacklist_fallback_delay": Key(_seconds, 900),
    # the relay
    "relay_max_message_size": Key(_size, "25MiB"),
    "relay_metrics_port": Key(_port, 9525),
    "relay_settings": Key(_table, {}),
    # per-destination shaping: [[delivery.destinations]] (the relay checks each entry)
    "relay_destinations": Key(_entries, []),
    # monitoring (roles/monitoring.py, docs/monitoring.md)
    "monitoring_host": Key(_optional(_not_placeholder), None),
    "monitoring_retention": Key(lambda v: prometheus_duration(v), "30d"),
    "scrape_interval": Key(lambda v: prometheus_duration(v), "30s"),
    "alert_for": Key(lambda v: alert_windows(v), {}),
}

TENANT_KEYS = {"name", "networks", "domains", "auth", "limits", "dkim", "tls_rules"}
# The tenant deploykit adds on every good gateway: local tools (the blacklist monitor's
# notices, Alertmanager) submit on 127.0.0.1 and would get 530 without one.
LOCAL_TENANT = "smg-local"
DKIM_ENTRY_KEYS = {"domain", "selector", "algorithm"}
DKIM_ALGORITHMS = ("rsa", "ed25519")


def passes_through(key: str) -> bool:
    """pyinfra's connection data and global arguments are not ours to check."""
    return key.startswith(("ssh_", "_"))


# --- entries of list keys ---------------------------------------------------------------------


def dkim_entry(item: Any) -> tuple[str, str, str] | str:
    """``(domain, selector, algorithm)`` from a ``dkim_domains`` entry, or what is wrong."""
    if not isinstance(item, dict):
        return f"expected {{'domain': ..., 'selector': ..., 'algorithm': 'rsa'}}, got {item!r}"
    unknown = sorted(set(item) - DKIM_ENTRY_KEYS)
    if unknown:
        return f"unknown key {unknown[0]!r} (known: algorithm, domain, selector)"
    try:
        domain = parse_domain(item.get("domain"))
    except ValueError as exc:
        return f"domain: {exc}"
    selector = item.get("selector")
    if not isinstance(selector, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", selector):
        return f"selector: expected a DKIM selector such as 's2025', got {selector!r}"
    algorithm = item.get("algorithm", "rsa")
    if algorithm not in DKIM_ALGORITHMS:
        return f"algorithm: must be 'rsa' or 'ed25519', got {algorithm!r}"
    return domain, selector, algorithm


def dkim_key_path(keys_dir: Path, domain: str, selector: str) -> Path:
    """Where ``smg dkim keygen --out KEYS_DIR`` writes the key."""
    return keys_dir / domain / f"{selector}.key"


def domain_pattern(value: Any) -> str:
    """``example.com``, ``.example.com`` (its subdomains) or ``*``."""
    if value is None:
        raise InvalidValue("required: a domain, .domain for its subdomains, or *")
    if value == "*":
        return "*"
    if isinstance(value, str) and value.startswith("."):
        return "." + parse_domain(value[1:])
    return parse_domain(value)


# --- tenants ------------------------------------------------------------------------------------


def tenants(value: Any) -> list[dict[str, Any]]:
    """The ``tenants`` list: its shape and what only the inventory can see (placeholders, clear
    text passwords).  What concerns the relay (overlapping networks, a domain of two customers,
    a key or rule for a domain not owned) is its own check of the rendered config."""
    if not isinstance(value, list):
        raise InvalidValue(f"expected a list of customers ({{'name': ..., ...}}), got {value!r}")
    for index, item in enumerate(value):
        why = _tenant_problem(item)
        if why:
            name = item.get("name") if isinstance(item, dict) else None
            who = f" (customer {name!r})" if isinstance(name, str) else ""
            raise InvalidValue(f"[{index}]{who}: {why}")
    return value


def _tenant_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return f"expected {{'name': ..., 'networks': [...], 'domains': [...]}}, got {item!r}"
    unknown = sorted(set(item) - TENANT_KEYS)
    if unknown:
        return f"unknown key {unknown[0]!r} (known: {', '.join(sorted(TENANT_KEYS))})"
    if item.get("name") == LOCAL_TENANT:
        return f"the name {LOCAL_TENANT!r} is the deploy's own loopback tenant"
    if _has_placeholder(item):
        return "holds a placeholder: set the real values"
    for key in ("networks", "domains", "auth", "dkim", "tls_rules"):
        if not isinstance(item.get(key, []), list):
            return f"{key}: expected a list, got {item[key]!r}"
    if not isinstance(item.get("limits", {}), dict):
        return f"limits: expected a dict, got {item['limits']!r}"
    for i, user in enumerate(item.get("auth", [])):
        if isinstance(user, dict) and ("password" in user or "password_hash" not in user):
            return (
                f"auth[{i}]: a clear text password is never written in the inventory: give "
                "password_hash (make it with: smg tenant hash-password)"
            )
    for i, entry in enumerate(item.get("dkim", [])):
        checked = dkim_entry(entry)
        if isinstance(checked, str):
            return f"dkim[{i}]: {checked}"
    return None


def _has_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return bool(PLACEHOLDER.search(value))
    if isinstance(value, dict):
        return any(_has_placeholder(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_placeholder(v) for v in value)
    return False


def tenant_dkim(gateway_tenants: Any) -> list[tuple[str, str, str]]:
    """``(domain, selector, algorithm)`` of every tenant's DKIM entry that parses."""
    out = []
    for tenant in gateway_tenants if isinstance(gateway_tenants, list) else []:
        for entry in tenant.get("dkim", []) if isinstance(tenant, dict) else []:
            checked = dkim_entry(entry)
            if not isinstance(checked, str):
                out.append(checked)
    return out


def tenant_networks(gateway_tenants: Any) -> list[str]:
    """The union of the tenants' networks, in order, each once."""
    nets: list[str] = []
    for tenant in gateway_tenants if isinstance(gateway_tenants, list) else []:
        for net in tenant.get("networks", []) if isinstance(tenant, dict) else []:
            try:
                nets.append(str(parse_network(net)))
            except ValueError:
                continue  # the relay's check names it
    return list(dict.fromkeys(nets))
