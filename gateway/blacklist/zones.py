"""From ``blacklist.zones`` in the config to :class:`ZoneSpec`: every key filled in.

A key set in the config wins; else the catalogue entry of a known list; else the generic
RFC 5782 reading.  The section's checks across keys live with the config
(:mod:`gateway.config.checks`): they need no catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.blacklist.catalogue import (
    DEFAULT_ZONES,
    GENERIC_ERROR_CODES,
    GENERIC_LISTING_CODES,
    known_list,
)
from gateway.config import BlacklistSection, DnsblZone

PROCEDURE_MAIL = "mail"  # a removal mail goes to the provider automatically
PROCEDURE_FORM = "form"  # an operator fills in the provider's delisting form
PROCEDURE_NONE = "none"  # nothing to ask for: the listing expires by itself


@dataclass(frozen=True)
class ZoneSpec:
    zone: str
    name: str
    major: bool
    ipv6: bool
    removal_url: str
    removal_mail: str | None
    removal_note: str
    listing_codes: Mapping[str, str]
    error_codes: Mapping[str, str]
    test_points: bool

    @property
    def procedure(self) -> str:
        if self.removal_mail:
            return PROCEDURE_MAIL
        return PROCEDURE_FORM if self.removal_url else PROCEDURE_NONE

    @property
    def procedure_text(self) -> str:
        """One line for tables, mails and tickets."""
        parts = []
        if self.removal_mail:
            parts.append(f"removal mail to {self.removal_mail} (sent automatically)")
        if self.removal_url:
            parts.append(f"delisting form {self.removal_url}")
        return "; ".join(parts) or "none: the listing expires by itself"


def zone_spec(entry: DnsblZone) -> ZoneSpec:
    known = known_list(entry.zone)

    def pick(value: object, from_catalogue: object, fallback: object) -> object:
        if value not in (None, ""):
            return value
        return from_catalogue if known is not None else fallback

    listing = entry.listing_codes or (known.listing_codes if known else GENERIC_LISTING_CODES)
    errors = {**GENERIC_ERROR_CODES, **(known.error_codes if known else {})}
    errors.update(entry.error_codes or {})
    return ZoneSpec(
        zone=entry.zone,
        name=str(pick(entry.name, known and known.name, entry.zone)),
        major=bool(pick(entry.major, known and known.major, False)),
        ipv6=bool(pick(entry.ipv6, known and known.ipv6, True)),
        removal_url=str(pick(entry.removal_url, known and known.removal_url, "")),
        removal_mail=entry.removal_mail,
        removal_note=known.removal_note if known else "",
        listing_codes=dict(listing),
        error_codes=errors,
        test_points=entry.test_points,
    )


def zone_specs(section: BlacklistSection) -> list[ZoneSpec]:
    """The zones to check: the configured ones, or the catalogue's defaults."""
    entries = section.zones or [DnsblZone(zone=zone) for zone in DEFAULT_ZONES]
    return [zone_spec(entry) for entry in entries]
