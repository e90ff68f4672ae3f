"""``[blacklist]`` in the config: keys, defaults from the catalogue, errors naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.blacklist.zones import PROCEDURE_FORM, PROCEDURE_MAIL, zone_specs
from gateway.config import ConfigError, parse_config


def config(**blacklist: Any) -> Any:
    return parse_config(
        {
            "gateway": {"hostname": "gw1.example.net"},
            "spam": {"enabled": False},
            "blacklist": blacklist,
        }
    )


def problems(**blacklist: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        config(**blacklist)
    return [(p.key, p.message) for p in caught.value.problems]


def test_empty_zones_mean_the_catalogue_defaults() -> None:
    specs = zone_specs(config(addresses=["198.51.100.10"]).blacklist)
    by_zone = {spec.zone: spec for spec in specs}
    assert by_zone["zen.spamhaus.org"].major is True
    assert by_zone["zen.spamhaus.org"].ipv6 is True
    assert by_zone["bl.spamcop.net"].ipv6 is False
    assert by_zone["psbl.surriel.com"].major is False
    assert by_zone["zen.spamhaus.org"].procedure == PROCEDURE_FORM


def test_configured_keys_win_over_the_catalogue() -> None:
    section = config(
        operations_mailbox="ops@example.net",
        notify_via="127.0.0.1:25",
        zones=[
            {"zone": "zen.spamhaus.org", "major": False, "name": "ZEN"},
            {
                "zone": "dnsbl.example.net",
                "removal_mail": "delist@example.net",
                "listing_codes": {"127.0.0.2": "spam", "127.0.1.0/24": "policy"},
                "error_codes": {"127.0.0.99": "quota exceeded"},
                "test_points": False,
                "ipv6": False,
            },
        ],
    ).blacklist
    zen, own = zone_specs(section)
    assert (zen.major, zen.name, zen.removal_url) == (False, "ZEN", "https://check.spamhaus.org/")
    assert own.listing_codes == {"127.0.0.2": "spam", "127.0.1.0/24": "policy"}
    assert own.error_codes["127.0.0.99"] == "quota exceeded"
    assert "127.255.255.0/24" in own.error_codes  # the generic errors stay
    assert own.procedure == PROCEDURE_MAIL and not own.test_points and not own.ipv6
    assert (own.name, own.major) == ("dnsbl.example.net", False)


def test_schedule_and_timezone_defaults() -> None:
    section = config().blacklist
    assert (section.schedule, section.timezone) == ("*-*-* 05:00:00", "Europe/Berlin")


@pytest.mark.parametrize(
    ("blacklist", "key", "words"),
    [
        (
            {"zones": [{"zone": "a.example", "listing_codes": {"10.0.0.2": "x"}}]},
            "blacklist.zones[0].listing_codes",
            "outside 127.0.0.0/8",
        ),
        (
            {"zones": [{"zone": "a.example", "error_codes": {"nonsense": "x"}}]},
            "blacklist.zones[0].error_codes",
            "not an IPv4 address",
        ),
        (
            {"zones": [{"zone": "a.example", "listing_codes": {"127.0.0.2": ""}}]},
            "blacklist.zones[0].listing_codes",
            "non-empty",
        ),
        ({"timezone": "Mars/Olympus"}, "blacklist.timezone", "not a time zone"),
        ({"schedule": "daily; rm -rf /"}, "blacklist.schedule", "calendar expression"),
        ({"operations_mailbox": "ops@example.net"}, "blacklist.notify_via", "go together"),
        (
            {"zones": [{"zone": "a.example"}, {"zone": "A.example."}]},
            "blacklist.zones[1].zone",
            "configured twice",
        ),
        (
            {"zones": [{"zone": "a.example", "removal_mail": "x@example.net"}]},
            "blacklist.zones[0].removal_mail",
            "needs notify_via",
        ),
        ({"addresses": ["198.51.100.1", "198.51.100.1"]}, "blacklist.addresses", "twice"),
        ({"addresses": ["198.51.100.300"]}, "blacklist.addresses", "expected an IP address"),
        ({"notify_attempts": 0}, "blacklist.notify_attempts", "at least 1"),
        (
            {"zones": [{"zone": "a.example", "colour": "red"}]},
            "blacklist.zones[0].colour",
            "unknown key",
        ),
    ],
)
def test_bad_values_name_the_key(blacklist: dict[str, Any], key: str, words: str) -> None:
    found = problems(**blacklist)
    assert any(k == key and words in message for k, message in found), found
