"""The checks of a loaded inventory: each host's keys and values, the fleet as a whole (roles,
unique addresses, monitor hosts), forced-TLS rules, DNSBL zones, DKIM entries and their keys,
certificates, and finally each host's relay config loaded with the relay's own schema.

Every problem is collected, each naming the file and the entry it is in; the caller
(:mod:`deploykit.inventory`) reports them all at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from deploykit.host import Gateway
from deploykit.loader import Layer, RawHost, RawInventory
from deploykit.paths import HostPaths
from deploykit.problems import Problem, Source
from deploykit.render import relay_config, to_toml
from deploykit.schema import (
    KEYS,
    REQUIRED,
    ROLES,
    dkim_entry,
    dkim_key_path,
    domain_pattern,
    passes_through,
)
from gateway.config import (
    ConfigError,
    ConfigProblem,
    DnsblZone,
    TlsRule,
    config_warnings,
    parse_config,
    parse_domain,
)
from gateway.dkim import DkimKeyError, load_private_key


class Checker:
    def __init__(self, raw: RawInventory, check_keys: bool) -> None:
        self.raw = raw
        self.check_keys = check_keys
        self.problems: list[Problem] = list(raw.problems)
        self.warnings: list[Problem] = []  # worth an operator's look, never a refusal
        self._parsed: dict[tuple[int, str], Any] = {}

    def problem(self, source: Source, entry: str, message: str) -> None:
        _add_once(self.problems, source, entry, message)

    def warn(self, source: Source, entry: str, message: str) -> None:
        _add_once(self.warnings, source, entry, message)

    # -- layers and keys

    def layers_for(self, host: RawHost) -> list[Layer]:
        layers = list(self.raw.group_layers.get("all", []))
        for group in self.raw.group_order:
            if group in host.groups or group == Path(self.raw.file).stem:
                layers += self.raw.group_layers.get(group, [])
        layers.append(Layer(host.entry, host.data))
        return layers

    def check_layer_keys(self) -> None:
        for group, layers in self.raw.group_layers.items():
            for layer in layers:
                self._check_keys(layer, is_host=False, group=group)
        for host in self.raw.hosts.values():
            self._check_keys(Layer(host.entry, host.data), is_host=True, group="")

    def _check_keys(self, layer: Layer, is_host: bool, group: str) -> None:
        for key in layer.data:
            if passes_through(key):
                continue
            spec = KEYS.get(key)
            if spec is None:
                hint = _close_match(key)
                self.problem(
                    layer.source, key, "unknown key" + (f" (did you mean {hint}?)" if hint else "")
                )
                continue
            if spec.per_host and not is_host:
                self.problem(layer.source, key, "is set per host, not for a group")
            # Values are read where they take effect (gateway()): a value that a later layer
            # overrides, such as production's placeholder under the lab's own, is no mistake.

    def parsed(self, layer: Layer, key: str, value: Any) -> Any:
        memo = (id(layer.data), key)
        if memo not in self._parsed:
            try:
                self._parsed[memo] = KEYS[key].parse(value)
            except ValueError as exc:
                self.problem(layer.source, key, str(exc))
                self._parsed[memo] = _BROKEN
        return self._parsed[memo]

    # -- hosts

    def gateway(self, host: RawHost) -> Gateway | None:
        roles = [g for g in host.groups if g in ROLES]
        others = [g for g in host.groups if g not in ROLES and g != Path(self.raw.file).stem]
        if others:
            self.problem(host.entry, "", f"unknown group {others[0]!r}: the groups are good, bad")
        if len(roles) != 1:
            what = "both good and bad" if roles else "neither good nor bad"
            self.problem(host.entry, "", f"the host is in {what}: put it in exactly one")
            return None
        settings: dict[str, Any] = {}
        sources: dict[str, Source] = {}
        winners: dict[str, Layer] = {}
        connection: dict[str, Any] = {}
        for layer in self.layers_for(host):
            for key in layer.data:
                if key in KEYS and not (KEYS[key].per_host and layer.data is not host.data):
                    winners[key] = layer
                elif key.startswith("ssh_"):
                    connection[key] = layer.data[key]
        for key, layer in winners.items():
            settings[key], sources[key] = self.parsed(layer, key, layer.data[key]), layer.source
        for key, spec in KEYS.items():
            if key in settings:
                continue
            if spec.default is REQUIRED:
                where = "the host's entry" if spec.per_host else "the inventory"
                self.problem(host.entry, key, f"required key is missing (set it in {where})")
                settings[key] = _BROKEN
            else:
                settings[key] = spec.default_value()
        return Gateway(host.name, roles[0], settings, host.entry, sources, connection)

    def source(self, gateway: Gateway, key: str) -> Source:
        return gateway.sources.get(key, gateway.entry)


class _Broken:
    def __repr__(self) -> str:
        return "<invalid>"


_BROKEN = _Broken()


def _add_once(items: list[Problem], source: Source, entry: str, message: str) -> None:
    label = f"{source.entry}: {entry}" if entry else source.entry
    item = Problem(source.file, label, message)
    if item not in items:
        items.append(item)


def _close_match(key: str) -> str | None:
    found = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.7)
    return found[0] if found else None


def is_parsed(*values: Any) -> bool:
    """None of ``values`` is a value the validation already refused (reported elsewhere)."""
    return all(v is not _BROKEN for v in values)


# -- checks across the fleet


def check_fleet(checker: Checker, gateways: list[Gateway]) -> None:
    file = checker.raw.file
    if not any(g.role == "bad" for g in gateways):
        checker.problem(Source(file, "bad"), "", "no bad gateway: spam must leave through one")
    if not any(g.role == "good" for g in gateways):
        checker.problem(Source(file, "good"), "", "no good gateway")
    _check_unique(checker, gateways, "public_address")
    _check_unique(checker, gateways, "listen_address")
    _check_unique(checker, gateways, "source_address")
    _check_unique(checker, gateways, "fqdn")
    names = {g.name for g in gateways}
    _check_monitoring(checker, gateways, names)
    for gateway in gateways:
        for name in (
            gateway["blacklist_monitor_hosts"]
            if is_parsed(gateway["blacklist_monitor_hosts"])
            else []
        ):
            if name not in names:
                checker.problem(
                    checker.source(gateway, "blacklist_monitor_hosts"),
                    "blacklist_monitor_hosts",
                    f"{name!r} is not a host of this inventory ({', '.join(sorted(names))})",
                )


def _check_monitoring(checker: Checker, gateways: list[Gateway], names: set[str]) -> None:
    """monitoring_host names a host of the inventory, the same on every host (one Prometheus
    scrapes the fleet); alert_for names alerts the kit ships."""
    from roles.monitoring import alert_names  # the rules template is the kit's, not deploykit's

    hosts = {g["monitoring_host"] for g in gateways if is_parsed(g["monitoring_host"])}
    for gateway in gateways:
        host = gateway["monitoring_host"]
        if is_parsed(host) and host is not None and host not in names:
            checker.problem(
                checker.source(gateway, "monitoring_host"), "monitoring_host",
                f"{host!r} is not a host of this inventory ({', '.join(sorted(names))})",
            )  # fmt: skip
        if len(hosts) > 1 and host != gateways[0]["monitoring_host"]:
            checker.problem(
                checker.source(gateway, "monitoring_host"), "monitoring_host",
                f"differs between hosts ({', '.join(sorted(map(str, hosts)))}): set it once",
            )  # fmt: skip
        windows = gateway["alert_for"] if is_parsed(gateway["alert_for"]) else {}
        for name in sorted(set(windows) - {"*"} - set(alert_names())):
            checker.problem(
                checker.source(gateway, "alert_for"), "alert_for",
                f"{name!r} is not an alert of templates/monitoring/smg-rules.yml.j2",
            )  # fmt: skip


def _check_unique(checker: Checker, gateways: list[Gateway], key: str) -> None:
    seen: dict[Any, str] = {}
    for gateway in gateways:
        value = gateway[key]
        if value is None:  # not set: the public address, checked as such
            continue
        if not is_parsed(value):
            continue
        if value in seen:
            checker.problem(gateway.entry, key, f"{value} is also {seen[value]}'s {key}")
        seen.setdefault(value, gateway.name)


def check_entries(checker: Checker, gateway: Gateway) -> None:
    if gateway.role == "good":
        _check_customers(checker, gateway)
    _check_ssh_networks(checker, gateway)
    _check_tls_rules(checker, gateway)
    _check_dnsbl_zones(checker, gateway)
    if gateway.role == "good":
        _check_dkim(checker, gateway)


def _check_customers(checker: Checker, gateway: Gateway) -> None:
    """Customers as ``tenants`` (issue 11) or the old ``customer_networks``, not both: a network
    left in the old key would get 554 once the gateway knows tenants (docs/deploy.md)."""
    tenants, networks = gateway["tenants"], gateway["customer_networks"]
    if not is_parsed(tenants, networks):
        return
    if tenants and networks:
        checker.problem(
            checker.source(gateway, "customer_networks"), "customer_networks",
            "set together with tenants: move each network into its customer's tenants entry "
            "and remove customer_networks (docs/deploy.md, migration)",
        )  # fmt: skip
    elif not tenants and not networks and not gateway["auth_networks"]:
        checker.problem(
            checker.source(gateway, "tenants"), "tenants",
            f"empty (and no customer_networks): the good gateway {gateway.name} would take "
            "mail from nobody",
        )  # fmt: skip
    if gateway["auth_networks"] and not tenants:
        checker.problem(
            checker.source(gateway, "auth_networks"), "auth_networks",
            "needs tenants: only a customer's AUTH user may log in",
        )  # fmt: skip
    if tenants and is_parsed(gateway["dkim_keys_dir"]) and checker.check_keys:
        _check_tenant_keys(checker, gateway, tenants)


def _check_tenant_keys(checker: Checker, gateway: Gateway, tenants: list[Any]) -> None:
    source = checker.source(gateway, "tenants")
    for t_index, tenant in enumerate(tenants):
        for index, item in enumerate(tenant.get("dkim", [])):
            entry = dkim_entry(item)
            if isinstance(entry, str):
                continue  # the schema refused it
            domain, selector, algorithm = entry
            label = f"tenants[{t_index}].dkim[{index}] ({domain}, customer {tenant['name']!r})"
            keys_dir = Path(gateway["dkim_keys_dir"])
            why = dkim_key_problem(keys_dir, domain, selector, algorithm, checker.raw.file)
            if why:
                checker.problem(source, label, why)


def _check_ssh_networks(checker: Checker, gateway: Gateway) -> None:
    """SSH open to the whole internet is allowed when written, but never quietly."""
    networks = gateway["ssh_networks"]
    if not is_parsed(networks):
        return  # missing or unparsable: already a problem of its own
    everyone = [n for n in networks if ipaddress.ip_network(n).prefixlen == 0]
    if everyone:
        checker.warn(
            checker.source(gateway, "ssh_networks"),
            "ssh_networks",
            f"{', '.join(everyone)} opens SSH on {gateway.name} to the whole internet: "
            "name the bastion or jump hosts' networks instead",
        )


def _check_tls_rules(checker: Checker, gateway: Gateway) -> None:
    rules = gateway["tls_rules"]
    if not is_parsed(rules):
        return
    source = checker.source(gateway, "tls_rules")
    allowed = {f.name for f in dataclasses.fields(TlsRule)}
    seen: dict[tuple[str, str], int] = {}
    for index, rule in enumerate(rules):
        entry = f"tls_rules[{index}]"
        if not isinstance(rule, dict):
            checker.problem(
                source, entry, f"expected a dict with sender and recipient, got {rule!r}"
            )
            continue
        for key in sorted(set(rule) - allowed):
            checker.problem(
                source, f"{entry}.{key}", f"unknown key (known: {', '.join(sorted(allowed))})"
            )
        pair = []
        for key in ("sender", "recipient"):
            try:
                pair.append(domain_pattern(rule.get(key)))
            except ValueError as exc:
                checker.problem(source, f"{entry}.{key}", str(exc))
        if len(pair) == 2:
            key = (pair[0], pair[1])
            if key in seen:
                checker.problem(
                    source,
                    entry,
                    f"conflicts with tls_rules[{seen[key]}]: both are for sender {pair[0]!r} "
                    f"and recipient {pair[1]!r}",
                )
            seen.setdefault(key, index)


def _check_dnsbl_zones(checker: Checker, gateway: Gateway) -> None:
    zones = gateway["dnsbl_zones"]
    if not is_parsed(zones):
        return
    source = checker.source(gateway, "dnsbl_zones")
    allowed = {f.name for f in dataclasses.fields(DnsblZone)}
    seen: dict[str, int] = {}
    for index, zone in enumerate(zones):
        entry = f"dnsbl_zones[{index}]"
        if not isinstance(zone, dict) or "zone" not in zone:
            checker.problem(source, entry, f"expected a dict with a zone, got {zone!r}")
            continue
        for key in sorted(set(zone) - allowed):
            checker.problem(
                source, f"{entry}.{key}", f"unknown key (known: {', '.join(sorted(allowed))})"
            )
        try:
            name = parse_domain(zone["zone"])
        except ValueError as exc:
            checker.problem(source, f"{entry}.zone", str(exc))
            continue
        if name in seen:
            checker.problem(source, entry, f"{name} is also dnsbl_zones[{seen[name]}]")
        seen.setdefault(name, index)


def _check_dkim(checker: Checker, gateway: Gateway) -> None:
    entries, keys_dir = gateway["dkim_domains"], gateway["dkim_keys_dir"]
    if not is_parsed(entries, keys_dir):
        return
    source = checker.source(gateway, "dkim_domains")
    seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(entries):
        entry = dkim_entry(item)
        label = f"dkim_domains[{index}]" + (
            f" ({item.get('domain')})" if isinstance(item, dict) else ""
        )
        if isinstance(entry, str):
            checker.problem(source, label, entry)
            continue
        domain, selector, algorithm = entry
        if (domain, selector) in seen:
            checker.problem(
                source,
                label,
                f"{selector}._domainkey.{domain} is also dkim_domains[{seen[(domain, selector)]}]",
            )
        seen.setdefault((domain, selector), index)
        if checker.check_keys:
            why = dkim_key_problem(Path(keys_dir), domain, selector, algorithm, checker.raw.file)
            if why:
                checker.problem(source, label, why)


def dkim_key_problem(
    keys_dir: Path, domain: str, selector: str, algorithm: str, inventory: str = "INVENTORY"
) -> str | None:
    path = dkim_key_path(keys_dir, domain, selector)
    if not path.exists():
        return (
            f"no key for this DKIM domain: {path} does not exist "
            f"(make it with: python -m deploykit dkim-keys {inventory})"
        )
    try:
        key = load_private_key(path)
    except DkimKeyError as exc:
        return str(exc)
    kind = "rsa" if hasattr(key, "key_size") else "ed25519"
    if kind != algorithm:
        return f"{path} is an {kind} key, the inventory says {algorithm}"
    return None


# -- the relay config: what the relay itself accepts


# Which inventory key a relay config key came from, for errors that name the inventory entry.
_CONFIG_ORIGINS = (
    ("tls_policy.rules", "tls_rules"),
    ("dkim.keys", "dkim_domains"),
    ("blacklist.zones", "dnsbl_zones"),
    ("delivery.destinations", "relay_destinations"),
    ("blacklist.operations_mailbox", "operations_mailbox"),
    ("blacklist.notify_via", "notify_via"),
    ("blacklist.ticket_url", "ticket_url"),
    ("blacklist.schedule", "blacklist_schedule"),
    ("blacklist.timezone", "blacklist_timezone"),
    ("gateway.client_networks", "customer_networks"),
    ("gateway.auth_networks", "auth_networks"),
    ("gateway.operations_mailbox", "operations_mailbox"),
    ("tenant_defaults", "tenant_defaults"),
    ("tenants", "tenants"),
    ("gateway.max_message_size", "relay_max_message_size"),
    ("dns.nameservers", "resolvers"),
    ("dns.extra_public_networks", "extra_public_networks"),
)


def check_relay_configs(checker: Checker, gateways: list[Gateway]) -> None:
    """Render each host's config and load it with the relay's own schema.  A refusal is told
    once per inventory entry, with the hosts it concerns."""
    refused: dict[tuple[Source, str, str], list[str]] = {}
    warned: dict[tuple[Source, str, str], list[str]] = {}
    for gateway in gateways:
        data = relay_config(gateways, gateway)
        try:
            config = parse_config(
                tomllib.loads(to_toml(data)), source=f"relay config of {gateway.name}"
            )
        except ConfigError as exc:
            _by_origin(checker, gateway, exc.problems, refused)
            continue
        _by_origin(checker, gateway, config_warnings(config), warned)
    for (source, origin, message), names in refused.items():
        checker.problem(
            source,
            origin,
            f"the relay would refuse {HostPaths.CONFIG} on {', '.join(names)}: {message}",
        )
    for (source, origin, message), names in warned.items():
        checker.warn(source, origin, f"the relay warns on {', '.join(names)}: {message}")


def _by_origin(
    checker: Checker,
    gateway: Gateway,
    problems: list[ConfigProblem],
    found: dict[tuple[Source, str, str], list[str]],
) -> None:
    """Each relay config problem under the inventory entry it came from, with its hosts."""
    for problem in problems:
        origin = _origin(gateway, problem.key)
        base_key = re.split(r"[.\[]", origin, maxsplit=1)[0]
        message = f"{problem.key}: {problem.message}"
        found.setdefault((checker.source(gateway, base_key), origin, message), []).append(
            gateway.name
        )


def _origin(gateway: Gateway, key: str) -> str:
    if _in_settings(gateway["relay_settings"], key):
        return "relay_settings"
    for prefix, inventory_key in _CONFIG_ORIGINS:
        if key == prefix or key.startswith((prefix + ".", prefix + "[")):
            return inventory_key + key[len(prefix) :]
    return "relay_settings"


def _in_settings(settings: Any, key: str) -> bool:
    node = settings
    for part in re.split(r"\.|\[", key):
        part = part.rstrip("]")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True
