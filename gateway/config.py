"""The relay's configuration: one TOML file, one typed schema, validated at load.

Every error names the file, the key and what is wrong, and all errors are reported at once so
that an operator fixes a file in one pass.  The same schema validates the deploy's inventories:
``roles/`` render this file from inventory data and load it through :func:`load_config` before
any host is touched.

Each section is a frozen dataclass.  A field's type says how its TOML value is parsed (see
``_PARSERS``); ``field(metadata={"parse": ...})`` overrides that for values with units
(sizes, durations) or structure (addresses, networks).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- errors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    key: str
    message: str


class ConfigError(Exception):
    """A configuration file is invalid; ``problems`` lists every error found."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(
            f"{self.source}: {p.key}: {p.message}" if p.key else f"{self.source}: {p.message}"
            for p in self.problems
        )


class _Invalid(ValueError):
    """Raised by a value parser; the message says what is wrong with the value."""


# --- value parsers --------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_size(value: Any) -> int:
    """``"25MiB"``, ``"10MB"``, ``1048576`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).upper() in _SIZE_UNITS:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    raise _Invalid(f"expected a size such as 25MiB, 10MB or a number of bytes, got {value!r}")


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"5d"``, ``"250ms"``, ``30`` -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise _Invalid(f"expected a duration such as 30s, 5m, 2h or 5d, got {value!r}")


def parse_domain(value: Any) -> str:
    """A DNS domain name, lower-cased, without a trailing dot."""
    if not isinstance(value, str):
        raise _Invalid(f"expected a domain name, got {value!r}")
    name = value.strip().rstrip(".").lower()
    try:
        ascii_name = name.encode("idna").decode("ascii") if name else ""
    except UnicodeError as exc:
        raise _Invalid(f"not a valid domain name: {value!r} ({exc})") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_DOMAIN_LABEL.match(x) for x in labels):
        raise _Invalid(f"not a valid domain name: {value!r}")
    return ascii_name


def parse_host_port(value: Any, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:2525"``, ``"[::1]:25"``, ``"mx.example.net"`` (with a default port)."""
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected HOST:PORT, got {value!r}")
    text = value.strip()
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?", text)
    if match:
        host, port = match.group(1), match.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:
        host, port = text, None  # a bare IPv6 address
    else:
        host, port = text, None
    if port is None:
        if default_port is None:
            raise _Invalid(f"expected HOST:PORT (the port is missing), got {value!r}")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _Invalid(f"port must be 1-65535 in {value!r}")
    return host, int(port)


def parse_ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise _Invalid(f"expected an IP address, got {value!r}") from None


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise _Invalid(f"expected a network such as 10.0.0.0/8, got {value!r}") from None


def parse_endpoint(value: Any) -> str:
    """A daemon's socket: ``unix:/path`` or ``tcp:HOST:PORT``."""
    if isinstance(value, str):
        if value.startswith("unix:/"):
            return value
        if value.startswith("tcp:"):
            parse_host_port(value[4:])
            return value
    raise _Invalid(f"expected unix:/path/to/socket or tcp:HOST:PORT, got {value!r}")


def parse_url(value: Any) -> str:
    if isinstance(value, str) and re.match(r"^https?://[^\s/]+", value):
        return value
    raise _Invalid(f"expected an http:// or https:// URL, got {value!r}")


def parse_url_or_unix(value: Any) -> str:
    """An http(s) URL, or ``unix:/path`` for a daemon's Unix socket (cheaper on one host)."""
    if isinstance(value, str) and value.startswith("unix:/"):
        return value
    return parse_url(value)


def parse_email(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", value.strip()):
        local, domain = value.strip().rsplit("@", 1)
        return f"{local}@{parse_domain(domain)}"
    raise _Invalid(f"expected a mail address such as ops@example.net, got {value!r}")


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value in allowed:
            return value
        raise _Invalid(f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")

    return parse


def int_range(low: int, high: int | None = None) -> Callable[[Any], int]:
    """A whole number in ``low..high`` (no upper bound when ``high`` is None)."""

    def parse(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise _Invalid(f"must be {bounds}, got {value}")
        return value

    return parse


def list_of(parse: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def parse_list(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _Invalid(f"expected a list, got {value!r}")
        out = []
        for index, item in enumerate(value):
            try:
                out.append(parse(item))
            except _Invalid as exc:
                raise _Invalid(f"item {index}: {exc}") from None
        return out

    return parse_list


def _parsed(parse: Callable[[Any], Any], default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field whose TOML value goes through ``parse``; its default is written the same way
    (``"5s"``) and parsed once here, so a section built in code gets typed values too."""
    if default is dataclasses.MISSING or default is None:
        return field(default=default, metadata={"parse": parse}, **kw)
    value = parse(default)
    if isinstance(value, list):
        return field(default_factory=lambda: list(value), metadata={"parse": parse}, **kw)
    return field(default=value, metadata={"parse": parse}, **kw)


# --- the schema -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySection:
    hostname: str = _parsed(parse_domain)
    role: str = _parsed(choice("good", "bad"), "good")
    listen: list[tuple[str, int]] = _parsed(list_of(parse_host_port), ["127.0.0.1:2525"])
    source_address: str | None = _parsed(parse_ip, None)
    spool: Path = Path("/var/spool/smg")
    max_message_size: int = _parsed(parse_size, "25MiB")
    client_networks: list[Any] = _parsed(list_of(parse_network), ["127.0.0.0/8"])
    max_recipients: int = _parsed(int_range(1), 100)
    max_connections: int = _parsed(int_range(1), 200)
    idle_timeout: float = _parsed(parse_duration, "300s")
    data_timeout: float = _parsed(parse_duration, "600s")
    max_line_length: int = _parsed(int_range(78), 998)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls_from_clients: bool = False
    metrics_listen: tuple[str, int] | None = _parsed(parse_host_port, None)
    log_format: str = _parsed(choice("text", "json"), "text")
    workers: int = _parsed(int_range(1, 64), 1)  # relay processes sharing listen + spool


@dataclass(frozen=True)
class DnsSection:
    nameservers: list[tuple[str, int]] = _parsed(
        list_of(lambda v: parse_host_port(v, default_port=53)), []
    )
    extra_public_networks: list[Any] = _parsed(list_of(parse_network), [])
    timeout: float = _parsed(parse_duration, "5s")
    cache_size: int = _parsed(int_range(0), 10000)
    negative_ttl_max: float = _parsed(parse_duration, "15m")


@dataclass(frozen=True)
class DeliverySection:
    port: int = _parsed(int_range(1, 65535), 25)
    max_lifetime: float = _parsed(parse_duration, "5d")
    retry_initial: float = _parsed(parse_duration, "5m")
    retry_max: float = _parsed(parse_duration, "1h")
    connect_timeout: float = _parsed(parse_duration, "30s")
    command_timeout: float = _parsed(parse_duration, "300s")
    concurrency: int = _parsed(int_range(1), 64)
    max_connections_per_host: int = _parsed(int_range(1), 10)
    connection_reuse: float = _parsed(parse_duration, "30s")
    scan_interval: float = _parsed(parse_duration, "1s")


@dataclass(frozen=True)
class VirusSection:
    enabled: bool = True
    clamd: str = _parsed(parse_endpoint, "unix:/run/clamav/clamd.ctl")
    timeout: float = _parsed(parse_duration, "60s")


@dataclass(frozen=True)
class SpamSection:
    enabled: bool = True
    rspamd_url: str = _parsed(parse_url_or_unix, "http://127.0.0.1:11333")
    timeout: float = _parsed(parse_duration, "20s")
    fail_open: bool = False
    spam_score: float = 6.0
    spam_actions: list[str] = _parsed(
        list_of(choice("reject", "soft reject", "rewrite subject", "add header", "greylist")),
        ["reject", "rewrite subject", "add header"],
    )


@dataclass(frozen=True)
class RoutingSection:
    bad_gateways: list[tuple[str, int]] = _parsed(
        list_of(lambda v: parse_host_port(v, default_port=25)), []
    )
    good_gateways: list[str] = _parsed(list_of(parse_ip), [])
    internal_ca: Path | None = None
    verdict_header: str = "X-SMG-Verdict"


@dataclass(frozen=True)
class DkimKey:
    domain: str = _parsed(parse_domain)
    selector: str = ""
    key: Path = Path()


@dataclass(frozen=True)
class DkimSection:
    keys: list[DkimKey] = field(default_factory=list)
    headers: list[str] = field(
        default_factory=lambda: [
            "from",
            "to",
            "cc",
            "subject",
            "date",
            "message-id",
            "reply-to",
            "mime-version",
            "content-type",
            "content-transfer-encoding",
        ]
    )


@dataclass(frozen=True)
class TlsRule:
    sender: str = ""
    recipient: str = ""
    level: str = _parsed(choice("encrypt", "verify"), "encrypt")
    on_failure: str = _parsed(choice("hold", "reject"), "hold")


@dataclass(frozen=True)
class TlsPolicySection:
    ca_bundle: Path = Path("/etc/ssl/certs/ca-certificates.crt")
    rules: list[TlsRule] = field(default_factory=list)
    hold_retry: float = _parsed(parse_duration, "15m")
    failure_memory: float = _parsed(parse_duration, "15m")  # intake's 5.7.10 after a TLS failure


@dataclass(frozen=True)
class MtaStsSection:
    enabled: bool = True
    https_port: int = 443
    ca_bundle: Path | None = None
    fetch_timeout: float = _parsed(parse_duration, "10s")


_LOOPBACK_8 = ipaddress.IPv4Network("127.0.0.0/8")


def parse_answer_codes(value: Any) -> dict[str, str]:
    """A DNSBL answer-code table: ``{"127.0.0.2" = "SBL", "127.0.0.4/30" = "XBL"}``.

    Keys are addresses or networks inside 127.0.0.0/8 (RFC 5782), values say what they mean.
    """
    if not isinstance(value, dict) or not value:
        raise _Invalid(f'expected a table such as {{ "127.0.0.2" = "listed" }}, got {value!r}')
    table = {}
    for code, meaning in value.items():
        try:
            network = ipaddress.IPv4Network(str(code).strip())
        except ValueError:
            raise _Invalid(f"{code!r} is not an IPv4 address or network") from None
        if not network.subnet_of(_LOOPBACK_8):
            raise _Invalid(f"{code!r} is outside 127.0.0.0/8, where DNSBL answers live")
        if not isinstance(meaning, str) or not meaning.strip():
            raise _Invalid(f"the meaning of {code!r} must be a non-empty string")
        key = str(network.network_address) if network.prefixlen == 32 else str(network)
        table[key] = meaning.strip()
    return table


def parse_timezone(value: Any) -> str:
    """An IANA time zone name known to this system (``Europe/Berlin``, ``UTC``)."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(str(value))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _Invalid(f"not a time zone known to this system: {value!r}") from None
    return str(value)


def parse_calendar(value: Any) -> str:
    """A systemd OnCalendar expression without the time zone (``*-*-* 05:00:00``)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9A-Za-z*:,./~ -]+", value.strip()):
        return value.strip()
    raise _Invalid(
        f"expected a systemd calendar expression such as '*-*-* 05:00:00', got {value!r}"
    )


@dataclass(frozen=True)
class DnsblZone:
    """One DNSBL zone to check.  Keys left out come from the built-in catalogue when the zone
    is a known list (``gateway/blacklist/catalogue.py``), else from the generic RFC 5782
    reading; see docs/blacklist.md."""

    zone: str = _parsed(parse_domain)
    name: str = ""  # shown in tables and mails; default: the catalogue's name, else the zone
    major: bool | None = None  # a listing here exits 2 (critical); default: catalogue, else no
    ipv6: bool | None = None  # ask for IPv6 addresses; default: catalogue, else yes
    removal_url: str = ""  # the provider's delisting form
    removal_mail: str | None = _parsed(parse_email, None)  # removal request mailed here
    listing_codes: dict[str, str] | None = _parsed(parse_answer_codes, None)
    error_codes: dict[str, str] | None = _parsed(parse_answer_codes, None)
    test_points: bool = True  # RFC 5782: 127.0.0.2 must be listed and 127.0.0.1 must not


@dataclass(frozen=True)
class BlacklistSection:
    addresses: list[str] = _parsed(list_of(parse_ip), [])  # the fleet's outbound addresses
    zones: list[DnsblZone] = field(default_factory=list)  # empty: the catalogue's defaults
    operations_mailbox: str | None = _parsed(parse_email, None)
    notify_via: tuple[str, int] | None = _parsed(parse_host_port, None)  # SMTP relay
    mail_from: str | None = _parsed(parse_email, None)  # default smg-blacklist@<hostname>
    ticket_url: str | None = _parsed(parse_url, None)
    ticket_id_field: str = "id"  # which key of the ticket system's JSON reply is the id
    notify_attempts: int = 10  # a failing notification is retried at this many checks
    notify_timeout: float = _parsed(parse_duration, "30s")  # per SMTP or HTTP attempt
    nameservers: list[tuple[str, int]] = _parsed(
        list_of(lambda v: parse_host_port(v, default_port=53)), []
    )  # empty: dns.nameservers (then /etc/resolv.conf)
    timeout: float = _parsed(parse_duration, "5s")  # per DNS lookup
    state: Path = Path("/var/lib/smg/blacklist.sqlite")
    schedule: str = _parsed(parse_calendar, "*-*-* 05:00:00")
    timezone: str = _parsed(parse_timezone, "Europe/Berlin")


@dataclass(frozen=True)
class Config:
    gateway: GatewaySection
    dns: DnsSection = field(default_factory=DnsSection)
    delivery: DeliverySection = field(default_factory=DeliverySection)
    virus: VirusSection = field(default_factory=VirusSection)
    spam: SpamSection = field(default_factory=SpamSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    dkim: DkimSection = field(default_factory=DkimSection)
    tls_policy: TlsPolicySection = field(default_factory=TlsPolicySection)
    mta_sts: MtaStsSection = field(default_factory=MtaStsSection)
    blacklist: BlacklistSection = field(default_factory=BlacklistSection)
    source: str = "<memory>"


# Keys the relay reads only when it starts: a SIGHUP does not apply them, so the deploy restarts
# the relay when one of them changes (roles/relay.py) and a reload logs a warning.
RESTART_ONLY: tuple[tuple[str, str], ...] = (
    ("gateway", "listen"),
    ("gateway", "spool"),
    ("gateway", "metrics_listen"),
    ("delivery", "concurrency"),
)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The ``section.key`` names of :data:`RESTART_ONLY` whose values differ."""
    return [
        f"{section}.{key}"
        for section, key in RESTART_ONLY
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    ]


# --- loading --------------------------------------------------------------------------------

_PARSERS: dict[Any, Callable[[Any], Any]] = {
    str: lambda v: v if isinstance(v, str) else _fail(f"expected a string, got {v!r}"),
    int: lambda v: (
        v
        if isinstance(v, int) and not isinstance(v, bool)
        else _fail(f"expected a whole number, got {v!r}")
    ),
    float: lambda v: (
        float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool)
        else _fail(f"expected a number, got {v!r}")
    ),
    bool: lambda v: v if isinstance(v, bool) else _fail(f"expected true or false, got {v!r}"),
    Path: lambda v: Path(v) if isinstance(v, str) and v else _fail(f"expected a path, got {v!r}"),
}


def _fail(message: str) -> Any:
    raise _Invalid(message)


class _Loader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[ConfigProblem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(key, message))

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            self.problem(prefix, f"expected a table, got {data!r}")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        for key in data:
            if key not in known:
                self.problem(f"{prefix}.{key}".lstrip("."), "unknown key")
        values: dict[str, Any] = {}
        for name, spec in known.items():
            key = f"{prefix}.{name}".lstrip(".")
            if name not in data and dataclasses.is_dataclass(hints[name]):
                data = {**data, name: {}}  # a missing section: validate its required keys
            if name not in data:
                default = self._default(spec, key)
                if default is not dataclasses.MISSING:
                    values[name] = default
                continue
            values[name] = self._value(spec, hints[name], data[name], key)
        try:
            return cls(**values)
        except TypeError:
            return None  # a required key was missing and already reported

    def _default(self, spec: dataclasses.Field, key: str) -> Any:
        if spec.default is not dataclasses.MISSING:
            return spec.default
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        self.problem(key, "required key is missing")
        return dataclasses.MISSING

    def _value(self, spec: dataclasses.Field, hint: Any, raw: Any, key: str) -> Any:
        try:
            if "parse" in spec.metadata:
                return spec.metadata["parse"](raw)
            return self._by_type(hint, raw, key)
        except _Invalid as exc:
            self.problem(key, str(exc))
            return None

    def _by_type(self, hint: Any, raw: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            return self._by_type(inner[0], raw, key)
        if origin is list:
            (item_type,) = typing.get_args(hint)
            if not isinstance(raw, list):
                raise _Invalid(f"expected a list, got {raw!r}")
            if dataclasses.is_dataclass(item_type):
                return [self.build(item_type, item, f"{key}[{i}]") for i, item in enumerate(raw)]
            return [self._by_type(item_type, item, f"{key}[{i}]") for i, item in enumerate(raw)]
        if dataclasses.is_dataclass(hint):
            return self.build(hint, raw, key)
        return _PARSERS[hint](raw)


def parse_config(data: dict[str, Any], source: str = "<memory>") -> Config:
    """Build a :class:`Config` from parsed TOML data, or raise :class:`ConfigError`."""
    loader = _Loader(source)
    config = loader.build(Config, data, "")
    if config is not None and not loader.problems:
        config = dataclasses.replace(config, source=source)
        for check in CROSS_CHECKS:
            for problem in check(config):
                loader.problems.append(problem)
    if loader.problems or config is None:
        raise ConfigError(source, loader.problems or [ConfigProblem("", "invalid")])
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate one TOML file; raise :class:`ConfigError` naming file and key."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [ConfigProblem("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("", f"not valid TOML: {exc}")]) from None
    return parse_config(data, source)


# --- checks across keys ---------------------------------------------------------------------


def _check_gateway_limits(config: Config) -> list[ConfigProblem]:
    gateway = config.gateway
    problems = []
    if gateway.max_message_size < 1024:
        problems.append(
            ConfigProblem("gateway.max_message_size", "must be at least 1KiB (1024 bytes)")
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
    from gateway.tls_policy import check_rules  # patterns and precedence live with the policy

    return check_rules(config)


def _check_blacklist(config: Config) -> list[ConfigProblem]:
    from gateway.blacklist.zones import check_section  # the catalogue lives with the feature

    return check_section(config)


# Feature modules append their own cross-key checks here (e.g. conflicting TLS rules).
CROSS_CHECKS: list[Callable[[Config], list[ConfigProblem]]] = [
    _check_gateway_limits,
    _check_routing,
    _check_tls_listener,
    _check_dkim_keys,
    _check_tls_rules,
    _check_blacklist,
]
