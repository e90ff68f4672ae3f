"""DNSBL query names and the reading of answer codes, from the catalogue's tables."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.blacklist.answers import LISTED, UNKNOWN, lookup_code, query_name, read_codes
from gateway.blacklist.catalogue import (
    CATALOGUE,
    DEFAULT_ZONES,
    GENERIC_ERROR_CODES,
    GENERIC_LISTING_CODES,
    known_list,
)
from gateway.blacklist.zones import zone_spec
from gateway.config import DnsblZone

ZEN = zone_spec(DnsblZone(zone="zen.spamhaus.org"))


# --- query names ------------------------------------------------------------------------------


def test_ipv4_query_name_reverses_octets() -> None:
    assert query_name("198.51.100.7", "zen.spamhaus.org") == "7.100.51.198.zen.spamhaus.org"


def test_ipv6_query_name_is_32_reversed_nibbles() -> None:
    name = query_name("2001:db8::25", "zen.spamhaus.org")
    assert name == (
        "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.spamhaus.org"
    )
    nibbles = name.removesuffix(".zen.spamhaus.org").split(".")
    assert len(nibbles) == 32
    # Read back: the nibbles, reversed, are the full address.
    assert ipaddress.ip_address(
        ":".join("".join(reversed(nibbles))[i : i + 4] for i in range(0, 32, 4))
    ) == ipaddress.ip_address("2001:db8::25")


def test_ipv6_query_name_expands_compressed_and_uppercase_forms() -> None:
    assert query_name("::1", "bl.test") == "1." + "0." * 31 + "bl.test"
    assert query_name("2001:DB8:0:0:0:0:0:25", "bl.test.") == query_name("2001:db8::25", "bl.test")


# --- Spamhaus ZEN, as its FAQ documents it ----------------------------------------------------


@pytest.mark.parametrize(
    ("code", "part"),
    [
        ("127.0.0.2", "SBL:"),
        ("127.0.0.3", "SBL CSS"),
        ("127.0.0.4", "XBL"),
        ("127.0.0.5", "XBL"),
        ("127.0.0.6", "XBL"),
        ("127.0.0.7", "XBL"),
        ("127.0.0.9", "DROP"),
        ("127.0.0.10", "PBL: ISP"),
        ("127.0.0.11", "PBL: Spamhaus"),
    ],
)
def test_spamhaus_listing_codes(code: str, part: str) -> None:
    reading = read_codes([code], ZEN.listing_codes, ZEN.error_codes)
    assert reading.status == LISTED
    assert part in reading.meaning


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("127.255.255.252", "typing error"),
        ("127.255.255.254", "public/open resolver"),
        ("127.255.255.255", "excessive number of queries"),
        ("127.255.255.250", "error answer"),  # an error code Spamhaus may add later: the range
    ],
)
def test_spamhaus_error_codes_are_unknown(code: str, words: str) -> None:
    reading = read_codes([code], ZEN.listing_codes, ZEN.error_codes)
    assert reading.status == UNKNOWN
    assert words in reading.meaning


def test_several_codes_at_once_are_all_read() -> None:
    reading = read_codes(["127.0.0.10", "127.0.0.2", "127.0.0.4"], ZEN.listing_codes, {})
    assert reading.status == LISTED
    assert reading.codes == ("127.0.0.2", "127.0.0.4", "127.0.0.10")  # numeric order
    assert (
        reading.meaning.index("SBL") < reading.meaning.index("XBL") < reading.meaning.index("PBL")
    )


@pytest.mark.parametrize(
    ("codes", "why"),
    [
        (["127.0.0.1"], "never a listing"),
        (["127.0.0.8"], "does not document"),  # a code ZEN does not use
        (["10.0.0.2"], "outside 127.0.0.0/8"),  # a resolver rewriting NXDOMAIN, a wildcard
        (["127.0.0.2", "127.255.255.254"], "public/open resolver"),  # mixed: not trusted
        (["127.0.0.2", "198.51.100.1"], "outside 127.0.0.0/8"),
        ([], "no codes"),
    ],
)
def test_anything_not_a_clear_listing_is_unknown(codes: list[str], why: str) -> None:
    reading = read_codes(codes, ZEN.listing_codes, ZEN.error_codes)
    assert reading.status == UNKNOWN
    assert why in reading.meaning


# --- tables -------------------------------------------------------------------------------------


def test_most_specific_network_wins_and_exact_codes_first() -> None:
    table = {"127.0.0.0/8": "any", "127.0.0.0/24": "narrow", "127.0.0.5": "exact"}
    assert lookup_code("127.0.0.5", table) == "exact"
    assert lookup_code("127.0.0.6", table) == "narrow"
    assert lookup_code("127.1.0.6", table) == "any"
    assert lookup_code("128.0.0.1", table) is None


def test_generic_reading_for_a_zone_of_our_own() -> None:
    spec = zone_spec(DnsblZone(zone="dnsbl.example.net"))
    assert spec.listing_codes == dict(GENERIC_LISTING_CODES)
    assert read_codes(["127.0.0.2"], spec.listing_codes, spec.error_codes).status == LISTED
    assert read_codes(["127.0.0.77"], spec.listing_codes, spec.error_codes).status == LISTED
    for code in ("127.0.0.1", "127.255.255.254", "127.255.255.1"):
        assert read_codes([code], spec.listing_codes, spec.error_codes).status == UNKNOWN


def test_catalogue_tables_are_valid_and_inside_127_8() -> None:
    loopback = ipaddress.ip_network("127.0.0.0/8")
    for entry in CATALOGUE:
        assert entry.listing_codes, entry.zone
        assert entry.removal_url.startswith("https://"), entry.zone
        for table in (entry.listing_codes, entry.error_codes, GENERIC_ERROR_CODES):
            for key in table:
                assert ipaddress.ip_network(key).subnet_of(loopback), (entry.zone, key)
        # No listing code may also be an error code (errors are looked at first).
        spec = zone_spec(DnsblZone(zone=entry.zone))
        for key in entry.listing_codes:
            first = key.split("/")[0]
            assert lookup_code(first, spec.error_codes) is None, (entry.zone, key)


def test_default_zones_are_the_major_lists_and_some_minor_ones() -> None:
    majors = {zone for zone in DEFAULT_ZONES if known_list(zone).major}
    assert majors == {"zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org"}
    assert {"dnsbl-1.uceprotect.net", "psbl.surriel.com", "bl.mailspike.net"} <= set(DEFAULT_ZONES)
    assert not any("sorbs" in zone for zone in DEFAULT_ZONES)  # shut down in 2024


def test_dqs_zone_with_a_key_is_known_as_spamhaus() -> None:
    entry = known_list("abcdefghijklmnop.zen.dq.spamhaus.net")
    assert entry is not None and entry.name == "Spamhaus ZEN (DQS)"
    assert known_list("zen.spamhaus.org.evil.example") is None
    assert known_list("notzen.spamhaus.org") is None


def test_mailspike_reputation_codes_l5_to_l3_are_listings() -> None:
    spec = zone_spec(DnsblZone(zone="bl.mailspike.net"))
    for code in ("127.0.0.2", "127.0.0.10", "127.0.0.11", "127.0.0.12"):
        assert read_codes([code], spec.listing_codes, spec.error_codes).status == LISTED
    assert read_codes(["127.0.0.13"], spec.listing_codes, spec.error_codes).status == UNKNOWN
