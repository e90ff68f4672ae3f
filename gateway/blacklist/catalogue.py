"""What the DNSBLs we know say, and how to get off them: data, read by ``answers.py``.

Each entry is written from the list's own documentation (the usage/FAQ pages named in
``docs``).  Answer codes are looked up in ``listing_codes`` and ``error_codes``; a key is an
address or a network inside 127.0.0.0/8, the most specific key wins and error codes are looked
at first.  A code a list does not document is read as *unknown*, never as a listing: an alert
that makes a human look, not a removal request sent on a guess.

``DEFAULT_ZONES`` is what ``blacklist.zones = []`` means.  SORBS is not here: Proofpoint shut it
down in 2024 and a dead list's answers are noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# RFC 5782 and every list below: 127.0.0.1 is never a listing, and lists that answer errors
# in-band put them in 127.255.255.0/24 (Spamhaus documents the range as "errors, not data").
GENERIC_ERROR_CODES: Mapping[str, str] = MappingProxyType(
    {
        "127.0.0.0": "127.0.0.0 is not a listing code",
        "127.0.0.1": "127.0.0.1 is never a listing (RFC 5782 test point for 'not listed')",
        "127.255.255.0/24": "an error answer of the list (query refused or not answerable)",
    }
)
# A zone of our own without a table: any other 127.0.0.0/8 answer is a listing (RFC 5782).
GENERIC_LISTING_CODES: Mapping[str, str] = MappingProxyType({"127.0.0.0/8": "listed"})


@dataclass(frozen=True)
class KnownList:
    zone: str
    name: str
    major: bool
    ipv6: bool  # the list publishes IPv6 data; asking an IPv4-only list only ever says "clean"
    removal_url: str
    removal_note: str  # how delisting works, for the notification and the runbook
    listing_codes: Mapping[str, str]
    error_codes: Mapping[str, str] = field(default_factory=dict)
    docs: str = ""
    default: bool = True  # part of DEFAULT_ZONES
    suffix: bool = False  # also matches "<key>.<zone>" (Spamhaus DQS puts a key in front)


def _codes(table: dict[str, str]) -> Mapping[str, str]:
    return MappingProxyType(table)


_SPAMHAUS_ZEN_CODES = _codes(
    {
        "127.0.0.2": "SBL: Spamhaus Block List (direct spam sources, spam operations)",
        "127.0.0.3": "SBL CSS: low-reputation sender seen in snowshoe or bulk spam",
        "127.0.0.4/30": "XBL: exploited host (malware, botnet, open proxy)",
        "127.0.0.9": "SBL DROP/EDROP: hijacked or criminal network",
        "127.0.0.10": "PBL: ISP-maintained policy listing (end-user range, no direct-to-MX mail)",
        "127.0.0.11": "PBL: Spamhaus-maintained policy listing (range should not send direct)",
    }
)
_SPAMHAUS_ERRORS = _codes(
    {
        "127.255.255.252": "typing error in the DNSBL name (Spamhaus error code)",
        "127.255.255.254": "query via a public/open resolver refused (Spamhaus error code)",
        "127.255.255.255": "excessive number of queries, rate limited (Spamhaus error code)",
    }
)
_SPAMHAUS_NOTE = (
    "Look the address up at the Spamhaus Blocklist Removal Center; it shows which part lists it "
    "(SBL/CSS: fix the cause and ask for removal there; XBL: clean the host, then self-remove; "
    "PBL: a mail server's address should not be in the PBL, remove it there as the "
    "address owner)."
)

CATALOGUE: tuple[KnownList, ...] = (
    KnownList(
        zone="zen.spamhaus.org",
        name="Spamhaus ZEN",
        major=True,
        ipv6=True,
        removal_url="https://check.spamhaus.org/",
        removal_note=_SPAMHAUS_NOTE,
        listing_codes=_SPAMHAUS_ZEN_CODES,
        error_codes=_SPAMHAUS_ERRORS,
        docs="https://www.spamhaus.org/faqs/dnsbl-usage/",
    ),
    KnownList(
        zone="zen.dq.spamhaus.net",
        name="Spamhaus ZEN (DQS)",
        major=True,
        ipv6=True,
        removal_url="https://check.spamhaus.org/",
        removal_note=_SPAMHAUS_NOTE,
        listing_codes=_SPAMHAUS_ZEN_CODES,
        error_codes=_SPAMHAUS_ERRORS,
        docs="https://docs.spamhaus.com/",
        default=False,  # needs a DQS key: configure zone = "<key>.zen.dq.spamhaus.net"
        suffix=True,
    ),
    KnownList(
        zone="bl.spamcop.net",
        name="SpamCop",
        major=True,
        ipv6=False,
        removal_url="https://www.spamcop.net/bl.shtml",
        removal_note=(
            "Listings expire by themselves about 24 hours after the reports stop; there is no "
            "removal form for the address owner. Stop the source, then wait."
        ),
        listing_codes=_codes({"127.0.0.2": "reported as a spam source by SpamCop users/traps"}),
        docs="https://www.spamcop.net/fom-serve/cache/291.html",
    ),
    KnownList(
        zone="b.barracudacentral.org",
        name="Barracuda BRBL",
        major=True,
        ipv6=False,
        removal_url="https://www.barracudacentral.org/rbl/removal-request",
        removal_note=(
            "Ask for removal with the form (contact mail and phone, reason); Barracuda answers "
            "only resolvers registered at barracudacentral.org (free)."
        ),
        listing_codes=_codes({"127.0.0.2": "poor reputation in the Barracuda Reputation System"}),
        docs="https://www.barracudacentral.org/rbl/how-to-use",
    ),
    KnownList(
        zone="dnsbl-1.uceprotect.net",
        name="UCEPROTECT level 1",
        major=False,
        ipv6=False,
        removal_url="https://www.uceprotect.net/en/rblcheck.php",
        removal_note=(
            "Level 1 expires by itself 7 days after the last spamtrap hit; express delisting is "
            "paid: do not pay without the service owner's approval."
        ),
        listing_codes=_codes({"127.0.0.2": "sent mail to UCEPROTECT spamtraps (level 1)"}),
        docs="https://www.uceprotect.net/en/index.php?m=3&s=3",
    ),
    KnownList(
        zone="psbl.surriel.com",
        name="PSBL",
        major=False,
        ipv6=False,
        removal_url="https://psbl.org/remove",
        removal_note="Anyone can remove an address with the web form at once.",
        listing_codes=_codes({"127.0.0.2": "sent mail to PSBL spamtraps"}),
        docs="https://psbl.org/howto/",
    ),
    KnownList(
        zone="bl.mailspike.net",
        name="Mailspike BL",
        major=False,
        ipv6=False,
        removal_url="https://mailspike.io/ip_verify",
        removal_note=(
            "Zero-hour and reputation listings change quickly and expire by themselves; "
            "IP Verify shows the level and takes delisting requests."
        ),
        listing_codes=_codes(
            {
                "127.0.0.2": "Z: seen in a distributed spam wave (zero-hour)",
                "127.0.0.10": "L5: worst possible reputation",
                "127.0.0.11": "L4: very bad reputation",
                "127.0.0.12": "L3: bad reputation",
            }
        ),
        docs="https://mailspike.org/usage.html",
    ),
    KnownList(
        zone="ix.dnsbl.manitu.net",
        name="NiX Spam",
        major=False,
        ipv6=False,
        removal_url="https://www.dnsbl.manitu.net/",
        removal_note="Widely used in Germany; listings expire by themselves, lookup page has a "
        "removal button.",
        listing_codes=_codes({"127.0.0.2": "sent mail to NiX Spam traps"}),
        docs="https://www.dnsbl.manitu.net/",
    ),
)

DEFAULT_ZONES: tuple[str, ...] = tuple(entry.zone for entry in CATALOGUE if entry.default)


def known_list(zone: str) -> KnownList | None:
    """The catalogue entry for ``zone`` (exact name, or ``<key>.<zone>`` for DQS entries)."""
    zone = zone.rstrip(".").lower()
    for entry in CATALOGUE:
        if zone == entry.zone or (entry.suffix and zone.endswith("." + entry.zone)):
            return entry
    return None
