"""How a DNSBL is asked (query names) and how its answer is read (code tables).

An answer is *listed* only when every code in it is a listing code of that list; any code the
list documents as an error, any code outside 127.0.0.0/8 (a wildcard or a resolver that
rewrites NXDOMAIN) and any code the list does not document make the whole answer *unknown*.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LISTED = "listed"
CLEAN = "clean"
UNKNOWN = "unknown"

_LOOPBACK_8 = ipaddress.IPv4Network("127.0.0.0/8")


def query_name(ip: str, zone: str) -> str:
    """``198.51.100.7`` -> ``7.100.51.198.<zone>``; IPv6 -> 32 reversed nibbles (RFC 5782)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv4Address):
        labels = str(address).split(".")
    else:
        labels = list(address.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone.rstrip(".")


@dataclass(frozen=True)
class Reading:
    status: str  # LISTED or UNKNOWN (an answer with records is never "clean")
    codes: tuple[str, ...]
    meaning: str


def lookup_code(code: str, table: Mapping[str, str]) -> str | None:
    """The meaning of ``code`` in ``table``: an exact key, else the most specific network."""
    if code in table:
        return table[code]
    address = ipaddress.IPv4Address(code)
    best: tuple[int, str] | None = None
    for key, meaning in table.items():
        if "/" not in key:
            continue
        network = ipaddress.IPv4Network(key)
        if address in network and (best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, meaning)
    return best[1] if best else None


def read_codes(
    codes: Iterable[str], listing_codes: Mapping[str, str], error_codes: Mapping[str, str]
) -> Reading:
    """Read the A records of one answer with the list's tables."""
    ordered = tuple(sorted(set(codes), key=_sort_key))
    listed: list[str] = []
    problems: list[str] = []
    for code in ordered:
        try:
            address = ipaddress.IPv4Address(code)
        except ValueError:
            problems.append(f"{code}: not an IPv4 address")
            continue
        if address not in _LOOPBACK_8:
            problems.append(f"{code}: outside 127.0.0.0/8, not a DNSBL answer")
            continue
        error = lookup_code(code, error_codes)
        if error is not None:
            problems.append(f"{code}: {error}")
            continue
        meaning = lookup_code(code, listing_codes)
        if meaning is None:
            problems.append(f"{code}: a code this list does not document")
        else:
            listed.append(f"{code} {meaning}")
    if problems or not listed:
        return Reading(UNKNOWN, ordered, "; ".join(problems) or "no codes")
    return Reading(LISTED, ordered, "; ".join(listed))


def _sort_key(code: str) -> tuple[int, str]:
    try:
        return (int(ipaddress.IPv4Address(code)), code)
    except ValueError:
        return (1 << 32, code)
