"""The relay's configuration: one TOML file, one typed schema, validated at load.

``from gateway.config import X`` is the public API; the modules behind it:

- :mod:`gateway.config.errors`: :class:`ConfigError` (every problem of a file at once),
  :class:`ConfigProblem`, :class:`InvalidValue` (raised by a value parser),
- :mod:`gateway.config.values`: the value parsers (sizes, durations, domains, addresses, ...),
- :mod:`gateway.config.schema`: the section dataclasses, :class:`Config`, :data:`RESTART_ONLY`,
- :mod:`gateway.config.bounds`: the bounded parsers (durations above zero, finite numbers,
  header names, the spool's size limit, network widths),
- :mod:`gateway.config.tenancy`: ``[tenant_defaults]``, the tenant tables and their checks,
- :mod:`gateway.config.checks`: the checks across keys, and :func:`config_warnings` (what is
  allowed but probably not meant, such as a rule that shadows MTA-STS),
- :mod:`gateway.config.loader`: :func:`parse_config` and :func:`load_config`.

The package imports nothing from the features it configures (TLS, blacklist, ...): they import
it.
"""

from gateway.config.checks import config_warnings
from gateway.config.errors import ConfigError, ConfigProblem, InvalidValue, render_warning
from gateway.config.loader import load_config, parse_config
from gateway.config.schema import (
    RESTART_ONLY,
    BlacklistSection,
    Config,
    DeliverySection,
    DkimKey,
    DkimSection,
    DnsblZone,
    DnsSection,
    GatewaySection,
    MtaStsSection,
    RoutingSection,
    SpamSection,
    TenantSection,
    TlsPolicySection,
    TlsRule,
    VirusSection,
    restart_only_changes,
)
from gateway.config.tenancy import TenantDefaults, TenantLimits, TenantUser, effective_limits
from gateway.config.values import (
    choice,
    int_range,
    list_of,
    parse_answer_codes,
    parse_calendar,
    parse_domain,
    parse_duration,
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

__all__ = [
    "RESTART_ONLY",
    "BlacklistSection",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DeliverySection",
    "DkimKey",
    "DkimSection",
    "DnsSection",
    "DnsblZone",
    "GatewaySection",
    "InvalidValue",
    "MtaStsSection",
    "RoutingSection",
    "SpamSection",
    "TenantDefaults",
    "TenantLimits",
    "TenantSection",
    "TenantUser",
    "TlsPolicySection",
    "TlsRule",
    "VirusSection",
    "choice",
    "config_warnings",
    "effective_limits",
    "int_range",
    "list_of",
    "load_config",
    "parse_answer_codes",
    "parse_calendar",
    "parse_config",
    "parse_domain",
    "parse_duration",
    "parse_email",
    "parse_endpoint",
    "parse_host_port",
    "parse_ip",
    "parse_network",
    "parse_size",
    "parse_timezone",
    "parse_url",
    "parse_url_or_unix",
    "render_warning",
    "restart_only_changes",
]
