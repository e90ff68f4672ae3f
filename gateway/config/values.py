"""Value parsers: one TOML value in, one typed value out, or :class:`InvalidValue` saying why.

The schema (:mod:`gateway.config.schema`) names a parser per field; the deploy's inventory
checks reuse them so that a value the relay would refuse is refused before any host is touched.
"""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from collections.abc import Callable
from typing import Any

from gateway.config.errors import InvalidValue

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
    raise InvalidValue(f"expected a size such as 25MiB, 10MB or a number of bytes, got {value!r}")


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"5d"``, ``"250ms"``, ``30`` -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise InvalidValue(f"expected a duration such as 30s, 5m, 2h or 5d, got {value!r}")


def parse_domain(value: Any) -> str:
    """A DNS domain name, lower-cased, without a trailing dot."""
    if not isinstance(value, str):
        raise InvalidValue(f"expected a domain name, got {value!r}")
    name = value.strip().rstrip(".").lower()
    try:
        ascii_name = name.encode("idna").decode("ascii") if name else ""
    except UnicodeError as exc:
        raise InvalidValue(f"not a valid domain name: {value!r} ({exc})") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_DOMAIN_LABEL.match(x) for x in labels):
        raise InvalidValue(f"not a valid domain name: {value!r}")
    return ascii_name


def parse_host_port(value: Any, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:2525"``, ``"[::1]:25"``, ``"mx.example.net"`` (with a default port)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"expected HOST:PORT, got {value!r}")
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
            raise InvalidValue(f"expected HOST:PORT (the port is missing), got {value!r}")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidValue(f"port must be 1-65535 in {value!r}")
    return host, int(port)


def parse_ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise InvalidValue(f"expected an IP address, got {value!r}") from None


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise InvalidValue(f"expected a network such as 10.0.0.0/8, got {value!r}") from None


def parse_endpoint(value: Any) -> str:
    """A daemon's socket: ``unix:/path`` or ``tcp:HOST:PORT``."""
    if isinstance(value, str):
        if value.startswith("unix:/"):
            return value
        if value.startswith("tcp:"):
            parse_host_port(value[4:])
            return value
    raise InvalidValue(f"expected unix:/path/to/socket or tcp:HOST:PORT, got {value!r}")


def parse_url(value: Any) -> str:
    if isinstance(value, str) and re.match(r"^https?://[^\s/]+", value):
        return value
    raise InvalidValue(f"expected an http:// or https:// URL, got {value!r}")


def parse_url_or_unix(value: Any) -> str:
    """An http(s) URL, or ``unix:/path`` for a daemon's Unix socket (cheaper on one host)."""
    if isinstance(value, str) and value.startswith("unix:/"):
        return value
    return parse_url(value)


def parse_email(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", value.strip()):
        local, domain = value.strip().rsplit("@", 1)
        return f"{local}@{parse_domain(domain)}"
    raise InvalidValue(f"expected a mail address such as ops@example.net, got {value!r}")


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value in allowed:
            return value
        raise InvalidValue(f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")

    return parse


def int_range(low: int, high: int | None = None) -> Callable[[Any], int]:
    """A whole number in ``low..high`` (no upper bound when ``high`` is None)."""

    def parse(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidValue(f"expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise InvalidValue(f"must be {bounds}, got {value}")
        return value

    return parse


def list_of(parse: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def parse_list(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise InvalidValue(f"expected a list, got {value!r}")
        out = []
        for index, item in enumerate(value):
            try:
                out.append(parse(item))
            except InvalidValue as exc:
                raise InvalidValue(f"item {index}: {exc}") from None
        return out

    return parse_list


_LOOPBACK_8 = ipaddress.IPv4Network("127.0.0.0/8")


def parse_answer_codes(value: Any) -> dict[str, str]:
    """A DNSBL answer-code table: ``{"127.0.0.2" = "SBL", "127.0.0.4/30" = "XBL"}``.

    Keys are addresses or networks inside 127.0.0.0/8 (RFC 5782), values say what they mean.
    """
    if not isinstance(value, dict) or not value:
        raise InvalidValue(f'expected a table such as {{ "127.0.0.2" = "listed" }}, got {value!r}')
    table = {}
    for code, meaning in value.items():
        try:
            network = ipaddress.IPv4Network(str(code).strip())
        except ValueError:
            raise InvalidValue(f"{code!r} is not an IPv4 address or network") from None
        if not network.subnet_of(_LOOPBACK_8):
            raise InvalidValue(f"{code!r} is outside 127.0.0.0/8, where DNSBL answers live")
        if not isinstance(meaning, str) or not meaning.strip():
            raise InvalidValue(f"the meaning of {code!r} must be a non-empty string")
        key = str(network.network_address) if network.prefixlen == 32 else str(network)
        table[key] = meaning.strip()
    return table


def parse_timezone(value: Any) -> str:
    """An IANA time zone name known to this system (``Europe/Berlin``, ``UTC``)."""
    try:
        zoneinfo.ZoneInfo(str(value))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidValue(f"not a time zone known to this system: {value!r}") from None
    return str(value)


def parse_calendar(value: Any) -> str:
    """A systemd OnCalendar expression without the time zone (``*-*-* 05:00:00``)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9A-Za-z*:,./~ -]+", value.strip()):
        return value.strip()
    raise InvalidValue(
        f"expected a systemd calendar expression such as '*-*-* 05:00:00', got {value!r}"
    )
