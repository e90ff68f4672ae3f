"""The deploy's inventory: loaded, validated and turned into each host's relay config.

A pyinfra inventory (``inventories/production.py``, ``inventories/lab.py``) names the hosts in
the groups ``good`` and ``bad``; the data comes from pyinfra's ``group_data/`` files beside it
(``all.py``, ``good.py``, ``bad.py``), from a group named after the inventory file (``lab`` in
``lab.py``: what differs at that site) and from each host's own entry.  Later layers win, exactly
as in pyinfra: all < good/bad < site < host.

Validation happens when the inventory file is loaded, before pyinfra connects to any host: the
inventory ends with ``validate_inventory(__file__, globals())``.  Every problem is reported at
once, each naming the file and the entry (``inventories/group_data/good.py: dkim_domains[1]
(example.org): no key ...``).  Each host's relay config (``/etc/smg/smg.toml``) is rendered here
and checked with :func:`gateway.config.parse_config`, so a value the relay would refuse never
reaches a host.  ``deploy.py`` then takes the validated :class:`Fleet` with :func:`current_fleet`.

Pure Python: no pyinfra import, so the tests use it directly.
"""

from __future__ import annotations

import ast
import contextvars
import dataclasses
import datetime as dt
import json
import re
import subprocess
import sys
import tomllib
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import (
    ConfigError,
    DnsblZone,
    TlsRule,
    parse_config,
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


# --- where things live on a gateway host ----------------------------------------------------


class HostPaths:
    """Paths on the gateway hosts; the roles and the rendered relay config agree on them."""

    USER = "smg"
    ETC = "/etc/smg"
    CONFIG = "/etc/smg/smg.toml"
    TLS_DIR = "/etc/smg/tls"
    CERT = "/etc/smg/tls/host.crt"
    KEY = "/etc/smg/tls/host.key"
    INTERNAL_CA = "/etc/smg/tls/internal-ca.crt"
    PUBLIC_CA = "/etc/smg/tls/public-ca.crt"
    DKIM_DIR = "/etc/smg/dkim"
    SPOOL = "/var/spool/smg"
    STATE_DIR = "/var/lib/smg"
    BLACKLIST_STATE = "/var/lib/smg/blacklist.sqlite"
    OPT = "/opt/smg"
    VENV = "/opt/smg/venv"
    WHEELHOUSE = "/opt/smg/wheelhouse"
    SMG = "/opt/smg/venv/bin/smg"
    CLAMD_SOCKET = "/run/clamav/clamd.ctl"
    SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

    @staticmethod
    def dkim_key(domain: str, selector: str) -> str:
        return f"/etc/smg/dkim/{domain}.{selector}.key"


RSPAMD_PORT = 11333
SMTP_PORT = 25


# --- errors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a value was written: the file and the entry in it (a host, or a group's data)."""

    file: str
    entry: str


@dataclass(frozen=True)
class Problem:
    file: str
    entry: str
    message: str

    def render(self) -> str:
        return f"{self.file}: {self.entry}: {self.message}"


class InventoryError(Exception):
    """The inventory is broken; ``problems`` lists every mistake, each naming file and entry."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"the inventory has {count} problem{'s' if count != 1 else ''}"
        return head + ":\n" + "\n".join("  " + p.render() for p in self.problems)


class _Invalid(ValueError):
    pass


# --- value parsers for inventory keys -------------------------------------------------------


def _not_placeholder(value: Any) -> Any:
    if isinstance(value, str) and PLACEHOLDER.search(value):
        raise _Invalid(f"{value!r} is a placeholder: set the real value")
    if isinstance(value, list) and any(isinstance(v, str) and PLACEHOLDER.search(v) for v in value):
        raise _Invalid(f"{value!r} holds a placeholder: set the real values")
    return value


def _ip(value: Any) -> str:
    _not_placeholder(value)
    return parse_ip(value)


def _networks(value: Any) -> list[str]:
    _not_placeholder(value)
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of networks such as ['10.0.0.0/8'], got {value!r}")
    return [str(_item(parse_network, item, index)) for index, item in enumerate(value)]


def _item(parse: Callable[[Any], Any], item: Any, index: int) -> Any:
    try:
        return parse(item)
    except ValueError as exc:
        raise _Invalid(f"[{index}]: {exc}") from None


def _ips(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of IP addresses, got {value!r}")
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
        raise _Invalid(f"expected a file path, got {value!r}")
    return value


def _timezone(value: Any) -> str:
    try:
        zoneinfo.ZoneInfo(str(value))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _Invalid(f"not a known time zone: {value!r} (e.g. Europe/Berlin)") from None
    return str(value)


def _calendar(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9A-Za-z*:,./~ -]+", value.strip()):
        return value.strip()
    raise _Invalid(f"expected a systemd OnCalendar expression such as '*-*-* 05:00:00': {value!r}")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected True or False, got {value!r}")


def _port(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    raise _Invalid(f"expected a TCP port (1-65535), got {value!r}")


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a list of host names, got {value!r}")
    return list(value)


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a dict of relay config sections, got {value!r}")
    return value


def _entries(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list, got {value!r}")
    return value


def _size(value: Any) -> Any:
    parse_size(value)
    return value


REQUIRED: Any = object()


@dataclass(frozen=True)
class Key:
    """One inventory key: how its value is read, its default, and whether it is per host."""

    parse: Callable[[Any], Any]
    default: Any = REQUIRED
    per_host: bool = False
    doc: str = ""


# Every key an inventory may set (docs/deploy.md documents each).  pyinfra's own connection
# keys (``ssh_*``) and global arguments (``_sudo`` ...) pass through untouched.
KEYS: dict[str, Key] = {
    # per host
    "public_address": Key(_ip, per_host=True, doc="the relay listens and sends from here"),
    "fqdn": Key(_domain, per_host=True, doc="EHLO name, NDR sender domain, certificate name"),
    "tls_cert_file": Key(_path, per_host=True, doc="the host's certificate (control machine)"),
    "tls_key_file": Key(_path, per_host=True, doc="its private key (control machine)"),
    # packages and the operating system
    "debian_mirror": Key(_url, "http://deb.debian.org/debian"),
    "debian_security_mirror": Key(_url, "http://deb.debian.org/debian-security"),
    "apt_proxy": Key(_optional(_url), None),
    "timezone": Key(_timezone, "Europe/Berlin"),
    "resolvers": Key(_ips, []),
    # networks
    "customer_networks": Key(_networks, []),
    "ssh_networks": Key(_networks, ["0.0.0.0/0", "::/0"]),
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
    "dkim_make_missing_keys": Key(_bool, False),
    # blacklist monitoring
    "operations_mailbox": Key(_optional(parse_email), None),
    "notify_via": Key(_optional(lambda v: parse_host_port(v, 25)), ("127.0.0.1", 25)),
    "ticket_url": Key(_optional(_url), None),
    "dnsbl_zones": Key(_entries, []),
    "blacklist_monitor_hosts": Key(_names, []),
    "blacklist_schedule": Key(_calendar, "*-*-* 05:00:00"),
    "blacklist_timezone": Key(_timezone, "Europe/Berlin"),
    # the relay
    "relay_max_message_size": Key(_size, "25MiB"),
    "relay_metrics_port": Key(_port, 9525),
    "relay_settings": Key(_table, {}),
}

DKIM_ENTRY_KEYS = {"domain", "selector", "algorithm"}
DKIM_ALGORITHMS = ("rsa", "ed25519")


def passes_through(key: str) -> bool:
    """pyinfra's connection data and global arguments are not ours to check."""
    return key.startswith(("ssh_", "_"))


# --- the validated fleet --------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    name: str
    role: str
    settings: Mapping[str, Any]  # every key of KEYS, parsed, merged by precedence
    sources: Mapping[str, Source]  # where each key that was set came from
    entry: Source  # the host's own entry
    connection: Mapping[str, Any] = field(default_factory=dict)  # pyinfra's ssh_* data

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    @property
    def public_address(self) -> str:
        return self.settings["public_address"]

    @property
    def fqdn(self) -> str:
        return self.settings["fqdn"]

    @property
    def runs_blacklist_monitor(self) -> bool:
        return self.name in self.settings["blacklist_monitor_hosts"]


@dataclass(frozen=True)
class Fleet:
    inventory_file: str
    gateways: tuple[Gateway, ...]
    relay_configs: Mapping[str, dict[str, Any]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Gateway]:
        return iter(self.gateways)

    def get(self, name: str) -> Gateway:
        for gateway in self.gateways:
            if gateway.name == name:
                return gateway
        raise KeyError(f"{name!r} is not a gateway of {self.inventory_file}")

    @property
    def good(self) -> list[Gateway]:
        return [g for g in self.gateways if g.role == "good"]

    @property
    def bad(self) -> list[Gateway]:
        return [g for g in self.gateways if g.role == "bad"]

    def relay_toml(self, name: str) -> str:
        return to_toml(self.relay_configs[name])


# --- reading the files (the same rules as pyinfra's CLI) ------------------------------------


@dataclass
class _Layer:
    source: Source
    data: dict[str, Any]


@dataclass
class _RawHost:
    name: str
    entry: Source
    data: dict[str, Any]
    groups: list[str] = field(default_factory=list)


@dataclass
class _RawInventory:
    file: str
    hosts: dict[str, _RawHost]
    group_layers: dict[str, list[_Layer]]  # group -> layers, later ones win
    group_order: list[str]  # pyinfra's order: the file's groups, then the site group
    problems: list[Problem] = field(default_factory=list)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _is_group(name: str, value: Any) -> bool:
    if name.startswith("_"):
        return False
    hosts = value[0] if isinstance(value, tuple) and value else value
    return isinstance(hosts, list) and all(isinstance(h, (str, tuple)) for h in hosts)


def _read_inventory(path: Path, namespace: Mapping[str, Any]) -> _RawInventory:
    file = _display(path)
    raw = _RawInventory(file=file, hosts={}, group_layers={}, group_order=[])
    inline: dict[str, dict[str, Any]] = {}
    for name, value in namespace.items():
        if not _is_group(name, value):
            continue
        members, data = (value[0], value[1]) if isinstance(value, tuple) else (value, {})
        if not isinstance(data, dict):
            raw.problems.append(Problem(file, name, "group data must be a dict"))
            data = {}
        inline[name] = data
        if name != "all":
            raw.group_order.append(name)
        for index, member in enumerate(members):
            _add_member(raw, name, index, member)
    site = path.stem
    if site not in raw.group_order:
        raw.group_order.append(site)
    for group in [*raw.group_order, "all"]:
        layers = raw.group_layers.setdefault(group, [])
        if inline.get(group):
            layers.append(_Layer(Source(file, f"group {group} (data in the inventory)"), {}))
            layers[-1].data = dict(inline[group])
    for folder in _group_data_folders(path):
        for file_path in sorted(folder.glob("*.py")):
            group = file_path.stem
            data = _exec_data_file(file_path, raw)
            layers = raw.group_layers.setdefault(group, [])
            layers.append(_Layer(Source(_display(file_path), f"group {group}"), data))
    return raw


def _add_member(raw: _RawInventory, group: str, index: int, member: Any) -> None:
    if isinstance(member, tuple):
        if len(member) != 2 or not isinstance(member[0], str) or not isinstance(member[1], dict):
            raw.problems.append(
                Problem(raw.file, f"{group}[{index}]", "expected 'name' or ('name', {data})")
            )
            return
        name, data = member
    else:
        name, data = member, {}
    host = raw.hosts.get(name)
    if host is None:
        entry = Source(raw.file, f"{group}[{index}] {name}")
        host = raw.hosts[name] = _RawHost(name, entry, {})
    if data:
        if host.data:
            raw.problems.append(
                Problem(
                    raw.file,
                    f"{group}[{index}] {name}",
                    f"the host's data is given twice (also at {host.entry.entry})",
                )
            )
        else:
            host.data, host.entry = dict(data), Source(raw.file, f"{group}[{index}] {name}")
    if group != "all" and group not in host.groups:
        host.groups.append(group)


def _group_data_folders(inventory: Path) -> list[Path]:
    """pyinfra reads ``group_data/`` in the working directory and beside the inventory."""
    folders = [Path.cwd() / "group_data", inventory.resolve().parent / "group_data"]
    unique = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in unique]:
            unique.append(folder)
    return unique


def _exec_data_file(path: Path, raw: _RawInventory) -> dict[str, Any]:
    """A group data file's top-level names, minus imports and dunders (as pyinfra does)."""
    text = path.read_text(encoding="utf-8")
    namespace: dict[str, Any] = {"__file__": str(path)}
    try:
        exec(compile(text, str(path), "exec"), namespace)
    except Exception as exc:
        raw.problems.append(Problem(_display(path), "(file)", f"cannot load: {exc!r}"))
        return {}
    imported = _imported_names(text)
    if "__all__" in namespace:
        keys = set(namespace["__all__"])
        return {k: v for k, v in namespace.items() if k in keys}
    return {k: v for k, v in namespace.items() if not k.startswith("__") and k not in imported}


def _imported_names(text: str) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update((a.asname or a.name) for a in node.names if a.name != "*")
    return names


# --- validation -----------------------------------------------------------------------------


class _Checker:
    def __init__(self, raw: _RawInventory, check_keys: bool) -> None:
        self.raw = raw
        self.check_keys = check_keys
        self.problems: list[Problem] = list(raw.problems)
        self._parsed: dict[tuple[int, str], Any] = {}

    def problem(self, source: Source, entry: str, message: str) -> None:
        label = f"{source.entry}: {entry}" if entry else source.entry
        item = Problem(source.file, label, message)
        if item not in self.problems:
            self.problems.append(item)

    # -- layers and keys

    def layers_for(self, host: _RawHost) -> list[_Layer]:
        layers = list(self.raw.group_layers.get("all", []))
        for group in self.raw.group_order:
            if group in host.groups or group == Path(self.raw.file).stem:
                layers += self.raw.group_layers.get(group, [])
        layers.append(_Layer(host.entry, host.data))
        return layers

    def check_layer_keys(self) -> None:
        for group, layers in self.raw.group_layers.items():
            for layer in layers:
                self._check_keys(layer, is_host=False, group=group)
        for host in self.raw.hosts.values():
            self._check_keys(_Layer(host.entry, host.data), is_host=True, group="")

    def _check_keys(self, layer: _Layer, is_host: bool, group: str) -> None:
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

    def parsed(self, layer: _Layer, key: str, value: Any) -> Any:
        memo = (id(layer.data), key)
        if memo not in self._parsed:
            try:
                self._parsed[memo] = KEYS[key].parse(value)
            except ValueError as exc:
                self.problem(layer.source, key, str(exc))
                self._parsed[memo] = _BROKEN
        return self._parsed[memo]

    # -- hosts

    def gateway(self, host: _RawHost) -> Gateway | None:
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
        winners: dict[str, _Layer] = {}
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
                settings[key] = _copy(spec.default)
        return Gateway(host.name, roles[0], settings, sources, host.entry, connection)

    def source(self, gateway: Gateway, key: str) -> Source:
        return gateway.sources.get(key, gateway.entry)


class _Broken:
    def __repr__(self) -> str:
        return "<invalid>"


_BROKEN = _Broken()


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value)) if isinstance(value, (list, dict)) else value


def _close_match(key: str) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.7)
    return found[0] if found else None


def _ok(*values: Any) -> bool:
    return all(v is not _BROKEN for v in values)


# -- checks across the fleet


def _check_fleet(checker: _Checker, gateways: list[Gateway]) -> None:
    file = checker.raw.file
    if not any(g.role == "bad" for g in gateways):
        checker.problem(Source(file, "bad"), "", "no bad gateway: spam must leave through one")
    if not any(g.role == "good" for g in gateways):
        checker.problem(Source(file, "good"), "", "no good gateway")
    _check_unique(checker, gateways, "public_address")
    _check_unique(checker, gateways, "fqdn")
    names = {g.name for g in gateways}
    for gateway in gateways:
        for name in (
            gateway["blacklist_monitor_hosts"] if _ok(gateway["blacklist_monitor_hosts"]) else []
        ):
            if name not in names:
                checker.problem(
                    checker.source(gateway, "blacklist_monitor_hosts"),
                    "blacklist_monitor_hosts",
                    f"{name!r} is not a host of this inventory ({', '.join(sorted(names))})",
                )


def _check_unique(checker: _Checker, gateways: list[Gateway], key: str) -> None:
    seen: dict[Any, str] = {}
    for gateway in gateways:
        value = gateway[key]
        if not _ok(value):
            continue
        if value in seen:
            checker.problem(gateway.entry, key, f"{value} is also {seen[value]}'s {key}")
        seen.setdefault(value, gateway.name)


def _check_entries(checker: _Checker, gateway: Gateway) -> None:
    if gateway.role == "good" and gateway["customer_networks"] == []:
        checker.problem(
            checker.source(gateway, "customer_networks"),
            "customer_networks",
            f"empty: the good gateway {gateway.name} would take mail from nobody",
        )
    _check_tls_rules(checker, gateway)
    _check_dnsbl_zones(checker, gateway)
    if gateway.role == "good":
        _check_dkim(checker, gateway)


def _check_tls_rules(checker: _Checker, gateway: Gateway) -> None:
    rules = gateway["tls_rules"]
    if not _ok(rules):
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
                pair.append(_domain_pattern(rule.get(key)))
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


def _domain_pattern(value: Any) -> str:
    """``example.com``, ``.example.com`` (its subdomains) or ``*``."""
    if value is None:
        raise _Invalid("required: a domain, .domain for its subdomains, or *")
    if value == "*":
        return "*"
    if isinstance(value, str) and value.startswith("."):
        return "." + parse_domain(value[1:])
    return parse_domain(value)


def _check_dnsbl_zones(checker: _Checker, gateway: Gateway) -> None:
    zones = gateway["dnsbl_zones"]
    if not _ok(zones):
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


def _check_dkim(checker: _Checker, gateway: Gateway) -> None:
    entries, keys_dir = gateway["dkim_domains"], gateway["dkim_keys_dir"]
    if not _ok(entries, keys_dir):
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


def dkim_key_problem(
    keys_dir: Path, domain: str, selector: str, algorithm: str, inventory: str = "INVENTORY"
) -> str | None:
    from gateway.dkim import DkimKeyError, load_private_key

    path = dkim_key_path(keys_dir, domain, selector)
    if not path.exists():
        return (
            f"no key for this DKIM domain: {path} does not exist "
            f"(make it with: python -m gateway.inventory dkim-keys {inventory})"
        )
    try:
        key = load_private_key(path)
    except DkimKeyError as exc:
        return str(exc)
    kind = "rsa" if hasattr(key, "key_size") else "ed25519"
    if kind != algorithm:
        return f"{path} is an {kind} key, the inventory says {algorithm}"
    return None


def _check_tls_files(checker: _Checker, gateway: Gateway) -> None:
    for key in ("internal_ca_file", "public_ca_file", "tls_cert_file", "tls_key_file"):
        value = gateway[key]
        if value is None or not _ok(value):
            continue
        if not Path(value).is_file():
            checker.problem(checker.source(gateway, key), key, f"{value}: no such file")
    cert, key = gateway["tls_cert_file"], gateway["tls_key_file"]
    if _ok(cert, key) and Path(cert).is_file() and Path(key).is_file():
        why = certificate_problem(Path(cert), Path(key), gateway)
        if why:
            checker.problem(checker.source(gateway, "tls_cert_file"), "tls_cert_file", why)


def certificate_problem(cert_path: Path, key_path: Path, gateway: Gateway) -> str | None:
    """The certificate must name the host, be valid now, and match its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        return f"cannot read the certificate or its key: {exc}"
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        return f"{cert_path} does not belong to the key {key_path}"
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return f"{cert_path} is not valid now (valid {start:%Y-%m-%d} to {end:%Y-%m-%d})"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"{cert_path} has no subjectAltName"
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    if _ok(gateway.fqdn, gateway.public_address) and not (
        gateway.fqdn in names or gateway.public_address in addresses
    ):
        return f"{cert_path} names neither {gateway.fqdn} nor {gateway.public_address}"
    return None


# --- the relay config of each host ----------------------------------------------------------


def relay_config(fleet_gateways: list[Gateway], gateway: Gateway) -> dict[str, Any]:
    """``/etc/smg/smg.toml`` for ``gateway`` as TOML data (see docs/configuration.md)."""
    good = [g for g in fleet_gateways if g.role == "good"]
    bad = [g for g in fleet_gateways if g.role == "bad"]
    is_good = gateway.role == "good"
    clients = (
        gateway["customer_networks"] if is_good else [_host_net(g.public_address) for g in good]
    )
    config: dict[str, Any] = {
        "gateway": {
            "role": gateway.role,
            "hostname": gateway.fqdn,
            # Loopback too: local tools (the blacklist monitor's notifications) submit there.
            "listen": [_host_port(gateway.public_address, SMTP_PORT), f"127.0.0.1:{SMTP_PORT}"],
            "source_address": gateway.public_address,
            "spool": HostPaths.SPOOL,
            "max_message_size": gateway["relay_max_message_size"],
            "client_networks": [*clients, "127.0.0.0/8"],
            "tls_cert": HostPaths.CERT,
            "tls_key": HostPaths.KEY,
            "metrics_listen": f"127.0.0.1:{gateway['relay_metrics_port']}",
        },
        "dns": {
            "nameservers": [_host_port(ip, 53) for ip in gateway["resolvers"]],
            "extra_public_networks": gateway["extra_public_networks"],
        },
        "virus": {"enabled": is_good, "clamd": f"unix:{HostPaths.CLAMD_SOCKET}"},
        "spam": {"enabled": is_good, "rspamd_url": f"http://127.0.0.1:{RSPAMD_PORT}"},
        "routing": {
            "bad_gateways": [_host_port(g.public_address, SMTP_PORT) for g in bad]
            if is_good
            else [],
            "good_gateways": [g.public_address for g in good],
            "internal_ca": HostPaths.INTERNAL_CA,
        },
        "dkim": {"keys": _dkim_keys(gateway) if is_good else []},
        "tls_policy": {"ca_bundle": _ca_bundle(gateway), "rules": _tls_rules(gateway)},
        "mta_sts": {"ca_bundle": _ca_bundle(gateway)},
        "blacklist": _blacklist(fleet_gateways, gateway),
    }
    if not is_good:
        # Only the good gateways send here, over TLS verified against the internal CA.
        config["gateway"]["require_tls_from_clients"] = True
    return _merge(config, gateway["relay_settings"])


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _host_net(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _ca_bundle(gateway: Gateway) -> str:
    return HostPaths.PUBLIC_CA if gateway["public_ca_file"] else HostPaths.SYSTEM_CA_BUNDLE


def _dkim_keys(gateway: Gateway) -> list[dict[str, str]]:
    keys = []
    for item in gateway["dkim_domains"]:
        entry = dkim_entry(item)
        if not isinstance(entry, str):
            domain, selector, _ = entry
            keys.append(
                {
                    "domain": domain,
                    "selector": selector,
                    "key": HostPaths.dkim_key(domain, selector),
                }
            )
    return keys


def _tls_rules(gateway: Gateway) -> list[dict[str, Any]]:
    return [dict(rule) for rule in gateway["tls_rules"] if isinstance(rule, dict)]


def _blacklist(gateways: list[Gateway], gateway: Gateway) -> dict[str, Any]:
    section: dict[str, Any] = {
        "addresses": [g.public_address for g in gateways],
        "zones": [dict(z) for z in gateway["dnsbl_zones"] if isinstance(z, dict)],
        "state": HostPaths.BLACKLIST_STATE,
        "schedule": gateway["blacklist_schedule"],
        "timezone": gateway["blacklist_timezone"],
    }
    if gateway["operations_mailbox"]:
        section["operations_mailbox"] = gateway["operations_mailbox"]
        host, port = gateway["notify_via"]
        section["notify_via"] = _host_port(host, port)
    if gateway["ticket_url"]:
        section["ticket_url"] = gateway["ticket_url"]
    return section


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Which inventory key a relay config key came from, for errors that name the inventory entry.
_CONFIG_ORIGINS = (
    ("tls_policy.rules", "tls_rules"),
    ("dkim.keys", "dkim_domains"),
    ("blacklist.zones", "dnsbl_zones"),
    ("blacklist.operations_mailbox", "operations_mailbox"),
    ("blacklist.notify_via", "notify_via"),
    ("blacklist.ticket_url", "ticket_url"),
    ("blacklist.schedule", "blacklist_schedule"),
    ("blacklist.timezone", "blacklist_timezone"),
    ("gateway.client_networks", "customer_networks"),
    ("gateway.max_message_size", "relay_max_message_size"),
    ("dns.nameservers", "resolvers"),
    ("dns.extra_public_networks", "extra_public_networks"),
)


def _check_relay_configs(checker: _Checker, gateways: list[Gateway]) -> dict[str, dict[str, Any]]:
    """Render each host's config and load it with the relay's own schema.  A refusal is told
    once per inventory entry, with the hosts it concerns."""
    configs: dict[str, dict[str, Any]] = {}
    refused: dict[tuple[Source, str, str], list[str]] = {}
    for gateway in gateways:
        data = relay_config(gateways, gateway)
        try:
            parse_config(tomllib.loads(to_toml(data)), source=f"relay config of {gateway.name}")
        except ConfigError as exc:
            for problem in exc.problems:
                origin = _origin(gateway, problem.key)
                base_key = re.split(r"[.\[]", origin, maxsplit=1)[0]
                message = f"{problem.key}: {problem.message}"
                refused.setdefault((checker.source(gateway, base_key), origin, message), []).append(
                    gateway.name
                )
            continue
        configs[gateway.name] = data
    for (source, origin, message), names in refused.items():
        checker.problem(
            source,
            origin,
            f"the relay would refuse {HostPaths.CONFIG} on {', '.join(names)}: {message}",
        )
    return configs


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


# --- entry points ---------------------------------------------------------------------------

_FLEETS: dict[str, Fleet] = {}
_CHECK_KEYS: contextvars.ContextVar[bool] = contextvars.ContextVar("check_keys", default=True)
_SKIP: contextvars.ContextVar[bool] = contextvars.ContextVar("skip", default=False)
_TOOL: contextvars.ContextVar[bool] = contextvars.ContextVar("tool", default=False)


def validate_inventory(inventory_file: str | Path, namespace: Mapping[str, Any]) -> Fleet:
    """Validate the inventory whose module namespace is ``namespace``; raise
    :class:`InventoryError` naming file and entry for every mistake.  Called at the end of
    each inventory file, so a broken inventory stops pyinfra before it connects anywhere."""
    path = Path(inventory_file)
    if _SKIP.get():
        return Fleet(str(path), ())
    raw = _read_inventory(path, namespace)
    checker = _Checker(raw, check_keys=_CHECK_KEYS.get())
    checker.check_layer_keys()
    gateways = [g for g in (checker.gateway(h) for h in raw.hosts.values()) if g is not None]
    if not raw.hosts:
        checker.problem(Source(raw.file, "good"), "", "the inventory names no hosts")
    _check_fleet(checker, gateways)
    if _CHECK_KEYS.get() and not checker.problems:
        _make_missing_keys(checker, gateways)
    for gateway in gateways:
        _check_entries(checker, gateway)
        _check_tls_files(checker, gateway)
    configs = _check_relay_configs(checker, gateways) if not checker.problems else {}
    if checker.problems:
        error = InventoryError(checker.problems)
        if _TOOL.get():
            raise error
        # Loaded by pyinfra: the problems are the message, a traceback would only hide them.
        print(
            f"\n{error.render()}\n\nNothing was touched: fix the inventory and run again.",
            file=sys.stderr,
        )
        raise SystemExit(1)
    fleet = Fleet(raw.file, tuple(gateways), configs)
    _FLEETS[str(path.resolve())] = fleet
    return fleet


def _make_missing_keys(checker: _Checker, gateways: list[Gateway]) -> None:
    """``dkim_make_missing_keys = True`` (the lab): keys are made when the inventory is loaded,
    so that ``pyinfra inventories/lab.py deploy.py`` needs no step before it.  Production keeps
    it False: a key is made on purpose, and published by the customer before it signs."""
    wanted = [g for g in gateways if g["dkim_make_missing_keys"] is True]
    if not wanted:
        return
    try:
        make_dkim_keys(
            Fleet(checker.raw.file, tuple(wanted)),
            out=lambda line: print(f"{checker.raw.file}: {line}", file=sys.stderr),
        )
    except (subprocess.SubprocessError, OSError) as exc:
        source = checker.source(wanted[0], "dkim_make_missing_keys")
        checker.problem(source, "dkim_make_missing_keys", f"making the DKIM keys failed: {exc}")


def load_inventory(inventory_file: str | Path, *, check_keys: bool = True) -> Fleet:
    """Load and validate an inventory file the way pyinfra loads it (for tests and tools)."""
    path = Path(inventory_file)
    namespace: dict[str, Any] = {"__file__": str(path)}
    try:
        code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    except OSError as exc:
        raise InventoryError(
            [Problem(str(path), "(file)", f"cannot read: {exc.strerror}")]
        ) from None
    check_token = _CHECK_KEYS.set(check_keys)
    try:
        skip_token = _SKIP.set(True)  # the file's own validate_inventory() call waits for ours
        try:
            exec(code, namespace)
        finally:
            _SKIP.reset(skip_token)
        tool_token = _TOOL.set(True)
        try:
            return validate_inventory(path, namespace)
        finally:
            _TOOL.reset(tool_token)
    finally:
        _CHECK_KEYS.reset(check_token)


def current_fleet(host_names: list[str] | None = None) -> Fleet:
    """The fleet that the inventory file validated when pyinfra loaded it."""
    fleets = list(_FLEETS.values())
    if host_names is not None:
        fleets = [f for f in fleets if sorted(g.name for g in f) == sorted(host_names)]
    if len(fleets) != 1:
        raise InventoryError(
            [
                Problem(
                    "deploy.py",
                    "inventory",
                    "the inventory did not validate itself: it must end with "
                    "validate_inventory(__file__, globals()) (see docs/deploy.md)",
                )
            ]
        )
    return fleets[0]


# --- TOML -----------------------------------------------------------------------------------


def to_toml(data: Mapping[str, Any]) -> str:
    """The relay config as TOML: one ``[section]`` per table, ``[[section.key]]`` for lists of
    tables.  Enough for the relay's schema; checked by reading it back."""
    lines: list[str] = []
    for name, section in data.items():
        if not isinstance(section, Mapping):
            raise TypeError(f"top-level {name!r} must be a table")
        lines += _toml_table(name, section)
    text = "\n".join(lines).strip() + "\n"
    if tomllib.loads(text) != json.loads(json.dumps(dict(data))):
        raise ValueError("TOML rendering did not round-trip")  # a bug here, not in the input
    return text


def _toml_table(name: str, table: Mapping[str, Any]) -> list[str]:
    lines = ["", f"[{name}]"]
    nested: list[str] = []
    for key, value in table.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                nested += ["", f"[[{name}.{key}]]"]
                nested += [
                    f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items() if v is not None
                ]
        elif isinstance(value, Mapping):
            nested += _toml_table(f"{name}.{_toml_key(key)}", value)
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return lines + nested


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


# --- DKIM keys and their DNS records (control machine) --------------------------------------


def dkim_wanted(fleet: Fleet) -> dict[tuple[str, str], tuple[str, Path]]:
    """(domain, selector) -> (algorithm, keys dir) for every key a good gateway signs with."""
    wanted: dict[tuple[str, str], tuple[str, Path]] = {}
    for gateway in fleet.good:
        for item in gateway["dkim_domains"]:
            entry = dkim_entry(item)
            if not isinstance(entry, str):
                domain, selector, algorithm = entry
                wanted[(domain, selector)] = (algorithm, Path(gateway["dkim_keys_dir"]))
    return wanted


def make_dkim_keys(fleet: Fleet, out: Callable[[str], None] = print) -> list[Path]:
    """Make the keys that do not exist yet with ``smg dkim keygen`` (existing keys are never
    touched: they may be in DNS), then write ``dns-records.txt`` in each keys directory."""
    made = []
    for (domain, selector), (algorithm, keys_dir) in sorted(dkim_wanted(fleet).items()):
        path = dkim_key_path(keys_dir, domain, selector)
        if path.exists():
            continue
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "gateway.cli",
            "dkim",
            "keygen",
            "--domain",
            domain,
            "--selector",
            selector,
            "--algorithm",
            algorithm,
            "--out",
            str(keys_dir),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=120)
        out(f"made {path}")
        made.append(path)
    for keys_dir, text in dns_records(fleet).items():
        target = keys_dir / "dns-records.txt"
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            out(f"wrote {target}")
    return made


def dns_records(fleet: Fleet) -> dict[Path, str]:
    """The TXT records customers publish, per keys directory, as zone-file lines."""
    from gateway.dkim import dns_record_value, load_private_key, zone_line

    files: dict[Path, list[str]] = {}
    for (domain, selector), (_, keys_dir) in sorted(dkim_wanted(fleet).items()):
        key = load_private_key(dkim_key_path(keys_dir, domain, selector))
        lines = files.setdefault(keys_dir, [_DNS_HEADER])
        lines.append(zone_line(f"{selector}._domainkey.{domain}", dns_record_value(key)))
    return {d: "\n".join(lines) + "\n" for d, lines in files.items()}


_DNS_HEADER = (
    "; DKIM public keys of the Secure Mail Gateway: each customer publishes the line of its\n"
    "; domain in its zone before the deploy that starts signing with it.  Written by\n"
    "; python -m gateway.inventory dkim-keys; the private keys beside this file never leave\n"
    "; the control machine except to the good gateways."
)


# --- command line: python -m gateway.inventory ----------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m gateway.inventory", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate an inventory; print each host's role")
    check.add_argument("inventory")
    render = sub.add_parser("render", help="print the relay config a host gets")
    render.add_argument("inventory")
    render.add_argument("host")
    keys = sub.add_parser("dkim-keys", help="make missing DKIM keys, write dns-records.txt")
    keys.add_argument("inventory")
    args = parser.parse_args(argv)
    try:
        if args.command == "dkim-keys":
            make_dkim_keys(load_inventory(args.inventory, check_keys=False))
            load_inventory(args.inventory)  # now every key must be there
            return 0
        fleet = load_inventory(args.inventory)
    except InventoryError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    if args.command == "render":
        print(fleet.relay_toml(args.host), end="")
        return 0
    for gateway in fleet:
        print(f"{gateway.name:16} {gateway.role:4} {gateway.public_address:40} {gateway.fqdn}")
    print(f"{fleet.inventory_file}: valid ({len(fleet.gateways)} hosts)")
    return 0


if __name__ == "__main__":
    # The inventory files import gateway.inventory: run that module, not this __main__ copy,
    # so that both share one registry and one InventoryError.
    from gateway.inventory import main as _main

    sys.exit(_main())
