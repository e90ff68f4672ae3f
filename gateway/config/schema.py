"""The relay's configuration schema: one frozen dataclass per TOML section, and :class:`Config`.

A field's type says how its TOML value is parsed (see :mod:`gateway.config.loader`);
``field(metadata={"parse": ...})`` overrides that for values with units (sizes, durations) or
structure (addresses, networks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.bounds import (
    at_least_one,
    duration,
    finite_float,
    parse_ip_port,
    parse_optional_url,
    parse_patterns,
    parse_private_header,
    parse_rate,
    parse_signed_headers,
    whole,
)
from gateway.config.tenancy import (
    TenantDefaults,
    TenantLimits,
    TenantUser,
    parse_owned_domain,
    parse_tenant_name,
)
from gateway.config.values import (
    choice,
    int_range,
    list_of,
    parse_answer_codes,
    parse_calendar,
    parse_domain,
    parse_email,
    parse_endpoint,
    parse_host_port,
    parse_ip,
    parse_network,
    parse_size,
    parse_timezone,
    parse_url,
    parse_url_or_unix,
)


def _parsed(parse: Callable[[Any], Any], default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field whose TOML value goes through ``parse``; its default is written the same way
    (``"5s"``) and parsed once here, so a section built in code gets typed values too."""
    if default is dataclasses.MISSING or default is None:
        return field(default=default, metadata={"parse": parse}, **kw)
    value = parse(default)
    if isinstance(value, list):
        return field(default_factory=lambda: list(value), metadata={"parse": parse}, **kw)
    return field(default=value, metadata={"parse": parse}, **kw)


@dataclass(frozen=True)
class GatewaySection:
    hostname: str = _parsed(parse_domain)
    role: str = _parsed(choice("good", "bad"), "good")
    listen: list[tuple[str, int]] = _parsed(
        at_least_one(list_of(parse_host_port)), ["127.0.0.1:2525"]
    )
    source_address: str | None = _parsed(parse_ip, None)
    spool: Path = Path("/var/spool/smg")
    max_message_size: int = _parsed(parse_size, "25MiB")
    data_memory: int = _parsed(parse_size, "256MiB")  # message bytes in flight, per process
    client_networks: list[Any] = _parsed(list_of(parse_network), ["127.0.0.0/8"])
    max_recipients: int = _parsed(whole(1, 10000), 100)
    max_connections: int = _parsed(whole(1, 10000), 200)
    idle_timeout: float = _parsed(duration("1h"), "300s")
    data_timeout: float = _parsed(duration("6h"), "600s")
    max_line_length: int = _parsed(whole(78, 65536), 998)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls_from_clients: bool = False
    metrics_listen: tuple[str, int] | None = _parsed(parse_host_port, None)
    metrics_public: bool = False  # true: metrics_listen may be other than loopback
    log_format: str = _parsed(choice("text", "json"), "text")
    workers: int = _parsed(int_range(1, 64), 1)  # relay processes sharing listen + spool
    # --- tenants (issue 11): docs/tenants.md ---
    auth_networks: list[Any] = _parsed(list_of(parse_network), [])  # may connect, must AUTH
    session_deadline: float = _parsed(duration("1d"), "1h")  # a whole SMTP session
    command_deadline: float = _parsed(duration("1h"), "60s")  # one command line / DATA piece
    max_junk_commands: int = _parsed(whole(1, 100000), 100)  # NOOP, RSET, VRFY, HELP
    operations_mailbox: str | None = _parsed(parse_email, None)  # suspension notices


@dataclass(frozen=True)
class DnsSection:
    nameservers: list[tuple[str, int]] = _parsed(list_of(parse_ip_port(53)), [])
    extra_public_networks: list[Any] = _parsed(list_of(parse_network), [])
    timeout: float = _parsed(duration("60s"), "5s")
    cache_size: int = _parsed(whole(0, 1_000_000), 10000)
    negative_ttl_max: float = _parsed(duration("1d", zero=True), "15m")


@dataclass(frozen=True)
class DestinationLimits:
    """``[[delivery.destinations]]``: other limits for some recipient domains (big providers);
    keys left out take the ``delivery.destination_*`` defaults."""

    domains: list[str] = _parsed(at_least_one(list_of(parse_domain)))
    concurrency: int | None = _parsed(whole(1, 1000), None)
    rate: float | None = _parsed(parse_rate, None)


# A 421 anywhere, or a 4xx that says the sender goes too fast (deferrals for one message, such
# as greylisting, are not about the destination and do not pause it).
THROTTLE_REPLIES = [
    r"^421[ -]",
    r"(?i)^4\d\d[ -].*\b(rate limit|too many|throttl|exceeded|slow down)",
]


@dataclass(frozen=True)
class DeliverySection:
    port: int = _parsed(int_range(1, 65535), 25)
    max_lifetime: float = _parsed(duration("30d"), "5d")
    retry_initial: float = _parsed(duration("1d"), "5m")
    retry_max: float = _parsed(duration("7d"), "1h")
    connect_timeout: float = _parsed(duration("10m"), "30s")
    command_timeout: float = _parsed(duration("1h"), "300s")
    concurrency: int = _parsed(whole(1, 10000), 64)
    max_connections_per_host: int = _parsed(whole(1, 1000), 10)
    connection_reuse: float = _parsed(duration("1h", zero=True), "30s")
    scan_interval: float = _parsed(duration("1h", low="10ms"), "1s")
    # Shaping per destination (recipient domain): gateway/delivery/shaping.py
    destination_concurrency: int = _parsed(whole(1, 1000), 20)
    destination_rate: float = _parsed(parse_rate, 0)
    throttle_pause: float = _parsed(duration("1d"), "1m")
    throttle_pause_max: float = _parsed(duration("7d"), "30m")
    throttle_replies: list[str] = _parsed(parse_patterns, THROTTLE_REPLIES)
    destinations: list[DestinationLimits] = field(default_factory=list)


@dataclass(frozen=True)
class VirusSection:
    enabled: bool = True
    clamd: str = _parsed(parse_endpoint, "unix:/run/clamav/clamd.ctl")
    timeout: float = _parsed(duration("1h"), "60s")


@dataclass(frozen=True)
class SpamSection:
    enabled: bool = True
    rspamd_url: str = _parsed(parse_url_or_unix, "http://127.0.0.1:11333")
    timeout: float = _parsed(duration("1h"), "20s")
    fail_open: bool = False
    spam_score: float = _parsed(finite_float(-1000, 1000), 6.0)
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
    verdict_header: str = _parsed(parse_private_header, "X-SMG-Verdict")


@dataclass(frozen=True)
class DkimKey:
    domain: str = _parsed(parse_domain)
    selector: str = ""
    key: Path = Path()


@dataclass(frozen=True)
class DkimSection:
    keys: list[DkimKey] = field(default_factory=list)
    headers: list[str] = _parsed(
        parse_signed_headers,
        [
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
        ],
    )


@dataclass(frozen=True)
class TlsRule:
    sender: str = ""
    recipient: str = ""
    level: str = _parsed(choice("encrypt", "verify", "dane"), "encrypt")
    on_failure: str = _parsed(choice("hold", "reject"), "hold")


@dataclass(frozen=True)
class TlsPolicySection:
    ca_bundle: Path = Path("/etc/ssl/certs/ca-certificates.crt")
    rules: list[TlsRule] = field(default_factory=list)
    hold_retry: float = _parsed(duration("1d"), "15m")
    failure_memory: float = _parsed(
        duration("1d", zero=True), "15m"
    )  # intake's 5.7.10 after a TLS failure
    # In-session check for reject rules (issue 14): remembered answers, else a live probe.
    dane: bool = True  # opportunistic DANE (RFC 7672) where secure TLSA records exist
    session_probe: bool = True
    session_probe_timeout: float = _parsed(duration("60s", low="1s"), "10s")
    session_probe_memory: float = _parsed(duration("1d", zero=True), "10m")
    session_probe_limit: int = _parsed(whole(1, 100000), 60)  # probes per sender domain a minute


@dataclass(frozen=True)
class MtaStsSection:
    enabled: bool = True
    https_port: int = _parsed(int_range(1, 65535), 443)
    ca_bundle: Path | None = None
    fetch_timeout: float = _parsed(duration("5m"), "10s")


@dataclass(frozen=True)
class DnsblZone:
    """One DNSBL zone to check.  Keys left out come from the built-in catalogue when the zone
    is a known list (``gateway/blacklist/catalogue.py``), else from the generic RFC 5782
    reading; see docs/blacklist.md."""

    zone: str = _parsed(parse_domain)
    name: str = ""  # shown in tables and mails; default: the catalogue's name, else the zone
    major: bool | None = None  # a listing here exits 2 (critical); default: catalogue, else no
    ipv6: bool | None = None  # ask for IPv6 addresses; default: catalogue, else yes
    removal_url: str = _parsed(parse_optional_url, "")  # the provider's delisting form
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
    notify_attempts: int = _parsed(whole(1, 1000), 10)  # retried at this many checks
    notify_timeout: float = _parsed(duration("10m"), "30s")  # per SMTP or HTTP attempt
    # empty: dns.nameservers (then /etc/resolv.conf)
    nameservers: list[tuple[str, int]] = _parsed(list_of(parse_ip_port(53)), [])
    timeout: float = _parsed(duration("60s"), "5s")  # per DNS lookup
    state: Path = Path("/var/lib/smg/blacklist.sqlite")
    schedule: str = _parsed(parse_calendar, "*-*-* 05:00:00")
    timezone: str = _parsed(parse_timezone, "Europe/Berlin")


@dataclass(frozen=True)
class TenantSection:
    """One ``[[tenants]]`` table: a customer (gateway/config/tenancy.py, docs/tenants.md)."""

    name: str = _parsed(parse_tenant_name)
    networks: list[Any] = _parsed(list_of(parse_network), [])
    domains: list[str] = _parsed(list_of(parse_owned_domain), [])
    auth: list[TenantUser] = field(default_factory=list)
    limits: TenantLimits = field(default_factory=TenantLimits)
    dkim: list[DkimKey] = field(default_factory=list)
    tls_rules: list[TlsRule] = field(default_factory=list)


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
    tenant_defaults: TenantDefaults = field(default_factory=TenantDefaults)
    tenants: list[TenantSection] = field(default_factory=list)
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
