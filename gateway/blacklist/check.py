"""One blacklist check: ask, record, notify, and say how bad it is (Nagios exit code).

Order inside the check lock: start a check row; look every address up in every zone; record
results and open/close listings, requests and outbox items in one transaction; deliver the
outbox (new items and those left over from earlier checks); finish the check row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.blacklist.answers import CLEAN, LISTED, UNKNOWN
from gateway.blacklist.lookup import Result, lookup_all, resolver_for
from gateway.blacklist.notify import DeliveryReport, NetNotifier, Notifier, deliver_outbox
from gateway.blacklist.state import Changes, Channels, Store
from gateway.blacklist.zones import zone_specs
from gateway.config import Config

# Nagios plugin return codes.
OK, WARNING, CRITICAL, UNKNOWN_EXIT = 0, 1, 2, 3
EXIT_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN_EXIT: "UNKNOWN"}


class CheckError(Exception):
    """The check cannot run (nothing to check, state unusable)."""


@dataclass
class CheckReport:
    check_id: int
    started_at: datetime
    finished_at: datetime
    results: list[Result]
    skipped: list[tuple[str, str]]
    since: dict[tuple[str, str], str]  # (ip, zone) -> when the open listing was opened
    changes: Changes
    delivery: DeliveryReport
    exit_code: int = OK
    counts: dict[str, int] = field(default_factory=dict)


def exit_code(results: list[Result]) -> int:
    """2 if listed on a major list, else 1 if listed anywhere, else 3 if anything is unknown."""
    listed = [r for r in results if r.status == LISTED]
    if any(r.major for r in listed):
        return CRITICAL
    if listed:
        return WARNING
    if any(r.status == UNKNOWN for r in results):
        return UNKNOWN_EXIT
    return OK


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def run_check(
    config: Config,
    *,
    notifier: Notifier | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> CheckReport:
    section = config.blacklist
    if not section.addresses:
        raise CheckError(f"{config.source}: blacklist.addresses is empty: nothing to check")
    specs = zone_specs(section)
    by_zone = {spec.zone: spec for spec in specs}
    channels = Channels(
        mailbox=section.operations_mailbox is not None, ticket=section.ticket_url is not None
    )
    store = Store(section.state)
    try:
        with store.lock():
            started = clock()
            check_id = store.start_check(started)
            results, skipped = await lookup_all(resolver_for(config), section.addresses, specs)
            changes = store.apply_results(check_id, results, by_zone, started, channels)
            delivery = await deliver_outbox(
                store, config, by_zone, notifier or NetNotifier(config), clock
            )
            code = exit_code(results)
            counts = {s: sum(r.status == s for r in results) for s in (LISTED, UNKNOWN, CLEAN)}
            finished = clock()
            store.finish_check(check_id, finished, code, counts)
            since = {
                (listing["ip"], listing["zone"]): listing["opened_at"]
                for listing in store.listings(open_only=True)
            }
    finally:
        store.close()
    return CheckReport(
        check_id, started, finished, results, skipped, since, changes, delivery, code, counts
    )
