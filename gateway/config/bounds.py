"""Bounded value parsers: a value of the right type but outside what the relay can work with is
refused at load, naming file and key like any other error (issue 12: ``idle_timeout = 0``
took no mail, ``spam_score = nan`` never matched, ``max_message_size = "4GiB"`` could not be
stored, ``verdict_header = "From"`` would strip every From:).

Each parser wraps one of :mod:`gateway.config.values` and adds the bound; the bound of every
key is in its row of docs/configuration.md.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
import sqlite3
from collections.abc import Callable
from typing import Any

from gateway.config.errors import InvalidValue
from gateway.config.values import parse_duration, parse_host_port, parse_ip, parse_url

# --- durations and sizes ---------------------------------------------------------------------

_DURATION_UNITS = ((86400, "d"), (3600, "h"), (60, "m"), (1, "s"))


def _show_duration(seconds: float) -> str:
    for size, unit in _DURATION_UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds * 1000:g}ms"


def duration(high: str, *, low: str | None = None, zero: bool = False) -> Callable[[Any], float]:
    """A duration above zero (``zero``: or exactly zero, where it means "off"), at least
    ``low`` when given, at most ``high``: an unbounded wait overflows the event loop's clock
    and hides a typo (``5000d``)."""
    top = parse_duration(high)
    bottom = parse_duration(low) if low is not None else 0.0

    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if not math.isfinite(seconds):
            raise InvalidValue(f"expected a finite duration, got {value!r}")
        if seconds == 0 and zero:
            return seconds
        if seconds <= 0:
            raise InvalidValue(f"must be more than 0, got {value!r}")
        if seconds < bottom:
            raise InvalidValue(f"must be at least {low}, got {value!r}")
        if seconds > top:
            raise InvalidValue(f"must be at most {_show_duration(top)}, got {value!r}")
        return seconds

    return parse


# What one spool row can hold: the message is one BLOB of gateway/queue/store.py's messages
# table, and SQLite refuses a row whose record (every column together) is longer than
# SQLITE_LIMIT_LENGTH (SQLITE_MAX_LENGTH, 1,000,000,000 bytes in the default build Debian and
# Python ship).  The row also holds the envelope and the facts, and the stored copy is the
# message plus what the gateway adds (Received:, the verdict header, DKIM signatures): 1 MiB is
# kept for those.
HEADROOM = 1024 * 1024
MIN_MESSAGE_SIZE = 1024


@functools.cache
def spool_length_limit() -> int:
    """SQLite's limit on one string or BLOB in the library this Python links."""
    conn = sqlite3.connect(":memory:")
    try:
        return int(conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))
    finally:
        conn.close()


def max_message_size() -> int:
    return spool_length_limit() - HEADROOM


def message_size_problem(size: int) -> str | None:
    """Why ``gateway.max_message_size`` cannot be used, or None: at least 1 KiB, at most what
    one spool row stores.  (A check across keys, so that a file with a tiny size still gets
    all its other problems reported: the lower bound always was one.)"""
    if size < MIN_MESSAGE_SIZE:
        return "must be at least 1KiB (1024 bytes)"
    if size > max_message_size():
        return (
            f"must be at most {max_message_size()} bytes, got {size}: the spool stores a "
            f"message in one SQLite row of at most {spool_length_limit()} bytes, less 1 MiB "
            "for the envelope and the headers the gateway adds"
        )
    return None


# --- numbers ---------------------------------------------------------------------------------


def whole(low: int, high: int) -> Callable[[Any], int]:
    """A whole number in ``low..high``, saying which end was crossed."""

    def parse(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidValue(f"expected a whole number, got {value!r}")
        if value < low:
            raise InvalidValue(f"must be at least {low}, got {value}")
        if value > high:
            raise InvalidValue(f"must be at most {high}, got {value}")
        return value

    return parse


def finite_float(low: float, high: float) -> Callable[[Any], float]:
    """A number in ``low..high``; ``nan`` and ``inf`` (valid TOML) are refused: no score is
    ever at or above ``nan``, so such a threshold would silently turn the check off."""

    def parse(value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidValue(f"expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise InvalidValue(f"must be a finite number, got {value!r}")
        if not low <= number <= high:
            raise InvalidValue(f"must be between {low:g} and {high:g}, got {value!r}")
        return number

    return parse


# --- header names ----------------------------------------------------------------------------

# RFC 5322 3.6.8: field-name = 1*ftext, ftext = printable US-ASCII except ":".
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")

# Fields that mail, MIME, DKIM/ARC, lists and trace define: the verdict header is stripped from
# every message leaving the fleet and trusted on the bad gateway, so naming one of these would
# strip (or trust) what senders wrote.
_STANDARD_FIELDS = frozenset(
    (
        *("date", "from", "sender", "reply-to", "to", "cc", "bcc", "subject", "comments"),
        *("message-id", "in-reply-to", "references", "keywords", "mime-version"),
        *("return-path", "received", "received-spf", "authentication-results"),
        *("dkim-signature", "domainkey-signature", "auto-submitted", "precedence"),
        *("delivered-to", "disposition-notification-to", "original-recipient", "errors-to"),
    )
)
_STANDARD_PREFIXES = ("content-", "resent-", "list-", "arc-")


def parse_field_name(value: Any) -> str:
    """A header field name (RFC 5322 syntax: 1 to 76 printable ASCII characters, no colon)."""
    if not isinstance(value, str) or not _FIELD_NAME.fullmatch(value):
        raise InvalidValue(
            f"expected a header field name (printable ASCII without ':' or spaces), got {value!r}"
        )
    return value


def parse_private_header(value: Any) -> str:
    """``routing.verdict_header``: a field name that no standard defines."""
    name = parse_field_name(value)
    lower = name.lower()
    if lower in _STANDARD_FIELDS or lower.startswith(_STANDARD_PREFIXES):
        raise InvalidValue(
            f"{name!r} is a standard header field: the verdict header is removed from every "
            "message leaving the fleet; use a name of your own such as X-SMG-Verdict"
        )
    return name


def parse_signed_headers(value: Any) -> list[str]:
    """``dkim.headers``: field names, lower-cased; ``from`` must be one (RFC 6376 5.4)."""
    if not isinstance(value, list):
        raise InvalidValue(f"expected a list, got {value!r}")
    names = []
    for index, item in enumerate(value):
        try:
            names.append(parse_field_name(item).lower())
        except InvalidValue as exc:
            raise InvalidValue(f"item {index}: {exc}") from None
    if "from" not in names:
        raise InvalidValue("must include 'from' (RFC 6376 requires From: to be signed)")
    return names


# --- lists and addresses ----------------------------------------------------------------------


def at_least_one(parse: Callable[[Any], list[Any]]) -> Callable[[Any], list[Any]]:
    """A list parser that also refuses an empty list (a relay listening nowhere)."""

    def parse_nonempty(value: Any) -> list[Any]:
        items = parse(value)
        if not items:
            raise InvalidValue("must name at least one")
        return items

    return parse_nonempty


def parse_optional_url(value: Any) -> str:
    """An http(s) URL, or ``""`` for none."""
    return "" if value == "" else parse_url(value)


# --- networks ---------------------------------------------------------------------------------


def parse_ip_port(default_port: int) -> Callable[[Any], tuple[str, int]]:
    """``HOST[:PORT]`` whose host is an IP address (a resolver cannot be found by name)."""

    def parse(value: Any) -> tuple[str, int]:
        host, port = parse_host_port(value, default_port=default_port)
        return parse_ip(host), port

    return parse


def is_loopback_host(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The widest network a client or "extra public" network may be: wider ones make an open relay
# (or turn the internal-address check off).  A /8 is the loopback range and the old class A;
# an IPv6 /48 is one site's allocation (RFC 6177).
WIDEST_PREFIX = {4: 8, 6: 48}


def too_wide(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return network.prefixlen < WIDEST_PREFIX[network.version]


# --- delivery shaping ------------------------------------------------------------------------

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|sec|min|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(value: Any) -> float:
    """A message rate as messages per second: ``"100/s"``, ``"600/m"``, ``"3600/h"``; ``0``
    (or ``"0"``) means no limit.  At most 100,000/s: beyond, it is a typo."""
    if value in (0, "0"):
        return 0.0
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidValue(f'expected a rate like "100/s", "600/m" or "3600/h" (0: none), '
                           f"got {value!r}")  # fmt: skip
    per_second = float(match[1]) / _RATE_UNITS[match[2]]
    if not 0 < per_second <= 100_000:
        raise InvalidValue(f"must be above 0 and at most 100000/s, got {value!r}")
    return per_second


def parse_patterns(value: Any) -> list[str]:
    """Regular expressions (at most 50, each at most 200 characters), checked at load."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidValue(f"expected a list of regular expressions, got {value!r}")
    if len(value) > 50:
        raise InvalidValue(f"at most 50 patterns, got {len(value)}")
    for pattern in value:
        if not pattern or len(pattern) > 200:
            raise InvalidValue(f"a pattern must have 1 to 200 characters, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidValue(f"{pattern!r} is not a regular expression: {exc}") from None
    return list(value)
