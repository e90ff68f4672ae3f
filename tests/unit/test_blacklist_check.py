"""One check end to end with fake neighbours: a dict resolver, a recording notifier.

The same flows against a real DNS server, SMTP sink and HTTP endpoint are in
tests/integration/test_blacklist.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from gateway.blacklist import check as check_module
from gateway.blacklist.check import CRITICAL, OK, UNKNOWN_EXIT, WARNING, run_check
from gateway.blacklist.notify import ChannelDown, DeliveryError
from gateway.blacklist.state import StateError, Store, status_snapshot
from gateway.config import Config, parse_config
from gateway.dns import NXDOMAIN, TEMPFAIL, DnsResult
from gateway.dns import OK as DNS_OK

GOOD = "198.51.100.10"
OTHER = "198.51.100.11"
V6 = "2001:db8::25"


class FakeResolver:
    """Answers from ``records[(name, rdtype)]``; anything else is NXDOMAIN."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], DnsResult] = {}
        self.asked: list[tuple[str, str]] = []

    def set(self, name: str, rdtype: str, *texts: str) -> None:
        rdatas = [
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)
            for text in texts
        ]
        self.records[(name, rdtype)] = DnsResult(name, rdtype, DNS_OK, rdatas, 60)

    def fail(self, name: str, rcode: str) -> None:
        self.records[(name, "A")] = DnsResult(name, "A", TEMPFAIL, rcode=rcode)

    def clear(self, name: str) -> None:
        self.records = {k: v for k, v in self.records.items() if k[0] != name}

    async def query(self, name: str, rdtype: str) -> DnsResult:
        self.asked.append((name, rdtype))
        return self.records.get((name, rdtype)) or DnsResult(
            name, rdtype, NXDOMAIN, rcode="NXDOMAIN"
        )

    def zone(self, zone: str) -> None:
        """A healthy zone: RFC 5782 test point 127.0.0.2 listed."""
        self.set(f"2.0.0.127.{zone}", "A", "127.0.0.2")

    def list(self, ip: str, zone: str, code: str = "127.0.0.2", txt: str | None = None) -> None:
        name = ".".join(reversed(ip.split("."))) + "." + zone
        self.set(name, "A", code)
        if txt:
            self.set(name, "TXT", f'"{txt}"')

    def unlist(self, ip: str, zone: str) -> None:
        self.clear(".".join(reversed(ip.split("."))) + "." + zone)


class FakeNotifier:
    def __init__(self) -> None:
        self.mails: list[EmailMessage] = []
        self.posts: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.smtp_error: Exception | None = None
        self.http_error: Exception | None = None
        self.next_ticket = 100

    async def send_mail(self, message: EmailMessage) -> None:
        if self.smtp_error:
            raise self.smtp_error
        self.mails.append(message)

    async def post_json(
        self, url: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        if self.http_error:
            raise self.http_error
        self.posts.append((url, payload, headers))
        self.next_ticket += 1
        return {"id": f"CHG-{self.next_ticket}"} if payload["action"] == "open" else {}

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.mails]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 4, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver()
    fake.zone("major.test")
    fake.zone("minor.test")
    monkeypatch.setattr(check_module, "resolver_for", lambda config: fake)
    return fake


def make_config(tmp_path: Path, **extra: Any) -> Config:
    blacklist = {
        "addresses": [GOOD, OTHER],
        "state": str(tmp_path / "state.sqlite"),
        "operations_mailbox": "ops@example.net",
        "notify_via": "127.0.0.1:2525",
        "ticket_url": "http://127.0.0.1:8080/tickets",
        "zones": [
            {"zone": "major.test", "major": True, "removal_url": "https://major.test/remove"},
            {"zone": "minor.test", "removal_mail": "delist@minor.test"},
        ],
        **extra,
    }
    return parse_config(
        {
            "gateway": {"hostname": "gw1.example.net"},
            "spam": {"enabled": False},
            "blacklist": blacklist,
        },
        source="/etc/smg/smg.toml",
    )


def check(config: Config, notifier: FakeNotifier, clock: Clock) -> Any:
    return asyncio.run(run_check(config, notifier=notifier, clock=clock))


# --- exit codes --------------------------------------------------------------------------------


def test_clean_everywhere_exits_0(tmp_path: Path, resolver: FakeResolver) -> None:
    notifier = FakeNotifier()
    report = check(make_config(tmp_path), notifier, Clock())
    assert report.exit_code == OK
    assert report.counts == {"listed": 0, "unknown": 0, "clean": 4}
    assert notifier.mails == [] and notifier.posts == []


def test_minor_listing_exits_1_major_exits_2(tmp_path: Path, resolver: FakeResolver) -> None:
    config, notifier, clock = make_config(tmp_path), FakeNotifier(), Clock()
    resolver.list(GOOD, "minor.test")
    assert check(config, notifier, clock).exit_code == WARNING
    resolver.list(OTHER, "major.test")
    assert check(config, notifier, clock).exit_code == CRITICAL


def test_unknown_exits_3_but_a_listing_wins(tmp_path: Path, resolver: FakeResolver) -> None:
    config, notifier, clock = make_config(tmp_path), FakeNotifier(), Clock()
    resolver.fail("10.100.51.198.major.test", "SERVFAIL")
    report = check(config, notifier, clock)
    assert report.exit_code == UNKNOWN_EXIT
    [unknown] = [r for r in report.results if r.status == "unknown"]
    assert (unknown.ip, unknown.zone, unknown.meaning) == (
        GOOD,
        "major.test",
        "no answer: SERVFAIL",
    )
    resolver.list(OTHER, "minor.test")
    assert check(config, notifier, clock).exit_code == WARNING


@pytest.mark.parametrize("code", ["127.255.255.254", "127.255.255.255", "127.0.0.1", "10.1.2.3"])
def test_error_answers_are_unknown_and_notify_nobody(
    tmp_path: Path, resolver: FakeResolver, code: str
) -> None:
    config, notifier = make_config(tmp_path), FakeNotifier()
    resolver.list(GOOD, "major.test", code)
    report = check(config, notifier, Clock())
    assert report.exit_code == UNKNOWN_EXIT
    assert notifier.mails == [] and notifier.posts == []
    store = Store(config.blacklist.state)
    assert store.listings(open_only=True) == []


def test_timeout_is_unknown(tmp_path: Path, resolver: FakeResolver) -> None:
    resolver.fail("10.100.51.198.minor.test", "TIMEOUT")
    report = check(make_config(tmp_path), FakeNotifier(), Clock())
    assert report.exit_code == UNKNOWN_EXIT
    assert any("TIMEOUT" in r.meaning for r in report.results)


# --- RFC 5782 test points --------------------------------------------------------------------


def test_a_zone_not_listing_its_test_point_makes_its_results_unknown(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    resolver.clear("2.0.0.127.major.test")  # e.g. Barracuda to an unregistered resolver
    report = check(make_config(tmp_path), FakeNotifier(), Clock())
    major = [r for r in report.results if r.zone == "major.test"]
    assert {r.status for r in major} == {"unknown"}
    assert "test point 127.0.0.2 is not listed" in major[0].meaning
    assert {r.status for r in report.results if r.zone == "minor.test"} == {"clean"}
    assert report.exit_code == UNKNOWN_EXIT


def test_a_zone_listing_the_world_makes_its_results_unknown(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    resolver.set("1.0.0.127.minor.test", "A", "127.0.0.2")
    resolver.list(GOOD, "minor.test")
    notifier = FakeNotifier()
    report = check(make_config(tmp_path), notifier, Clock())
    minor = [r for r in report.results if r.zone == "minor.test"]
    assert {r.status for r in minor} == {"unknown"}
    assert "answers 'listed' for everything" in minor[0].meaning
    assert notifier.mails == []  # no removal request on a broken list's word


def test_test_points_can_be_switched_off(tmp_path: Path, resolver: FakeResolver) -> None:
    resolver.clear("2.0.0.127.major.test")
    zones = [{"zone": "major.test", "major": True, "test_points": False}]
    report = check(make_config(tmp_path, zones=zones), FakeNotifier(), Clock())
    assert report.exit_code == OK


# --- IPv6 -------------------------------------------------------------------------------------


def test_ipv6_asked_only_where_the_list_has_ipv6_data(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    zones = [{"zone": "major.test", "major": True}, {"zone": "minor.test", "ipv6": False}]
    config = make_config(tmp_path, addresses=[GOOD, V6], zones=zones)
    v6_name = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.major.test"
    resolver.set(v6_name, "A", "127.0.0.2")
    notifier = FakeNotifier()
    report = check(config, notifier, Clock())
    assert report.skipped == [(V6, "minor.test")]
    [listed] = [r for r in report.results if r.status == "listed"]
    assert (listed.ip, listed.query) == (V6, v6_name)
    assert report.exit_code == CRITICAL


# --- listings, notifications, removal requests, tickets -----------------------------------------


def test_new_listing_notifies_requests_removal_and_opens_a_ticket_once(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    config, notifier, clock = make_config(tmp_path), FakeNotifier(), Clock()
    resolver.list(GOOD, "minor.test", txt="spamtrap hit, see https://minor.test/lookup")
    report = check(config, notifier, clock)
    assert report.exit_code == WARNING and len(report.changes.opened) == 1

    # Ticket first (so the notice can name it), then the provider's removal mail, then the notice.
    [(url, payload, headers)] = notifier.posts
    assert url == "http://127.0.0.1:8080/tickets"
    assert payload["action"] == "open"
    assert (payload["ip"], payload["zone"], payload["since"]) == (
        GOOD,
        "minor.test",
        "2026-11-27T04:00:00Z",
    )
    assert payload["reason"] == "spamtrap hit, see https://minor.test/lookup"
    assert payload["procedure"] == "mail" and payload["removal_mail"] == "delist@minor.test"
    assert headers["Idempotency-Key"].startswith("smg-blacklist-ticket_open-")
    removal, notice = notifier.mails
    assert removal["To"] == "delist@minor.test" and removal["Cc"] == "ops@example.net"
    assert removal["Reply-To"] == "ops@example.net"
    assert GOOD in removal.get_content() and "please remove" in removal.get_content()
    assert notice["To"] == "ops@example.net"
    assert notice["From"] == "smg-blacklist@gw1.example.net"
    assert notice["Auto-Submitted"] == "auto-generated"
    assert str(notice["Subject"]) == f"[smg blacklist] LISTED: {GOOD} on minor.test"
    body = notice.get_content()
    for words in (
        f"Address:       {GOOD}",
        "Answer:        127.0.0.2 listed",
        "Reason (TXT):  spamtrap hit, see https://minor.test/lookup",
        "Listed since:  2026-11-27 04:00:00 UTC (05:00:00 CET Europe/Berlin)",
        "Procedure:     removal mail to delist@minor.test (sent automatically)",
        "Removal mail:  sent to delist@minor.test",
        "Ticket:        CHG-101",
        "smg blacklist status --config /etc/smg/smg.toml",
    ):
        assert words in body, words

    # The same listing at the next checks: nothing new.
    for _ in range(3):
        clock.advance(days=1)
        assert check(config, notifier, clock).changes.opened == []
    assert len(notifier.mails) == 2 and len(notifier.posts) == 1
    store = Store(config.blacklist.state)
    [listing] = store.listings(open_only=True)
    assert listing["ticket_id"] == "CHG-101"
    assert listing["last_seen_at"] == "2026-11-30T04:00:00Z"
    assert store.db.execute("SELECT count(*) FROM requests").fetchone()[0] == 1


def test_delisting_closes_the_request_and_says_how_long_it_lasted(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    config, notifier, clock = make_config(tmp_path), FakeNotifier(), Clock()
    resolver.list(GOOD, "major.test", txt="SBL-like")
    check(config, notifier, clock)
    clock.advance(days=2, hours=3, minutes=4)
    resolver.unlist(GOOD, "major.test")
    report = check(config, notifier, clock)
    assert report.exit_code == OK and len(report.changes.closed) == 1
    delisted = notifier.mails[-1]
    assert str(delisted["Subject"]) == (
        f"[smg blacklist] DELISTED: {GOOD} on major.test after 2 d 3 h 4 min"
    )
    assert "Request:       #1 closed" in delisted.get_content()
    close = notifier.posts[-1][1]
    assert close == {
        "action": "close",
        "request_id": 1,
        "ticket_id": "CHG-101",
        "ip": GOOD,
        "zone": "major.test",
        "list": "major.test",
        "since": "2026-11-27T04:00:00Z",
        "delisted_at": "2026-11-29T07:04:00Z",
        "duration_seconds": 2 * 86400 + 3 * 3600 + 4 * 60,
        "gateway": "gw1.example.net",
    }
    store = Store(config.blacklist.state)
    assert store.listings(open_only=True) == []
    [closed] = store.listings(closed_limit=10)
    assert closed["request_closed_at"] == "2026-11-29T07:04:00Z"
    assert closed["ticket_closed_at"] == "2026-11-29T07:04:00Z"
    # Listed again later: a new listing, a new request, a new notice.
    clock.advance(days=1)
    resolver.list(GOOD, "major.test")
    assert len(check(config, notifier, clock).changes.opened) == 1
    assert str(notifier.mails[-1]["Subject"]).startswith("[smg blacklist] LISTED")


def test_unknown_changes_nothing(tmp_path: Path, resolver: FakeResolver) -> None:
    config, notifier, clock = make_config(tmp_path), FakeNotifier(), Clock()
    resolver.list(GOOD, "major.test")
    check(config, notifier, clock)
    sent = len(notifier.mails)
    resolver.fail("10.100.51.198.major.test", "SERVFAIL")
    clock.advance(days=1)
    report = check(config, notifier, clock)
    assert report.exit_code == UNKNOWN_EXIT
    assert report.changes.opened == report.changes.closed == []
    assert len(notifier.mails) == sent
    [listing] = Store(config.blacklist.state).listings(open_only=True)
    assert listing["last_seen_at"] == "2026-11-27T04:00:00Z"  # not seen listed, not closed
    assert report.since[(GOOD, "major.test")] == "2026-11-27T04:00:00Z"


def test_failed_notifications_are_kept_and_retried_at_the_next_check(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    config, notifier, clock = make_config(tmp_path), FakeNotifier(), Clock()
    notifier.smtp_error = ChannelDown("SMTP relay 127.0.0.1:2525 unreachable: refused")
    notifier.http_error = DeliveryError("ticket system: HTTP 503 Service Unavailable")
    resolver.list(GOOD, "minor.test")
    report = check(config, notifier, clock)
    assert report.exit_code == WARNING  # the listing is recorded whatever the notices do
    assert {i["kind"] for i in report.delivery.failed} == {
        "ticket_open",
        "removal_mail",
        "listed_notice",
    }
    failed_notice = next(i for i in report.delivery.failed if i["kind"] == "listed_notice")
    assert failed_notice["error"].startswith("not tried: SMTP relay")  # one timeout per channel
    store = Store(config.blacklist.state)
    assert len(store.listings(open_only=True)) == 1
    assert {i["state"] for i in store.undelivered()} == {"pending"}

    notifier.smtp_error = notifier.http_error = None
    clock.advance(days=1)
    report = check(config, notifier, clock)
    assert len(report.delivery.sent) == 3 and report.changes.opened == []
    assert len(notifier.mails) == 2 and len(notifier.posts) == 1
    assert store.undelivered() == []
    assert "Ticket:        CHG-101" in notifier.mails[-1].get_content()


def test_retries_are_bounded(tmp_path: Path, resolver: FakeResolver) -> None:
    config, notifier, clock = make_config(tmp_path, notify_attempts=3), FakeNotifier(), Clock()
    notifier.smtp_error = ChannelDown("relay down")
    resolver.list(GOOD, "major.test")
    for _ in range(5):
        check(config, notifier, clock)
        clock.advance(days=1)
    store = Store(config.blacklist.state)
    [notice] = [i for i in store.undelivered() if i["kind"] == "listed_notice"]
    assert (notice["state"], notice["attempts"]) == ("failed", 3)
    assert len(store.listings(open_only=True)) == 1


def test_notice_says_when_the_ticket_could_not_be_opened(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    config, notifier = make_config(tmp_path), FakeNotifier()
    notifier.http_error = ChannelDown("ticket system unreachable: connection refused")
    resolver.list(GOOD, "major.test")
    check(config, notifier, Clock())
    body = notifier.mails[-1].get_content()
    assert "Ticket:        not opened yet: ticket system unreachable" in body
    assert "(retried at the next check)" in body


def test_delisted_before_the_ticket_was_opened_cancels_it(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    config, notifier, clock = make_config(tmp_path), FakeNotifier(), Clock()
    notifier.http_error = ChannelDown("down")
    resolver.list(GOOD, "minor.test")
    notifier.smtp_error = ChannelDown("down")
    check(config, notifier, clock)
    notifier.http_error = notifier.smtp_error = None
    resolver.unlist(GOOD, "minor.test")
    clock.advance(hours=24)
    check(config, notifier, clock)
    assert notifier.posts == []  # no ticket to open or close any more
    kinds = [str(m["Subject"]).split(":")[0] for m in notifier.mails]
    assert kinds == ["[smg blacklist] LISTED", "[smg blacklist] DELISTED"]  # no removal mail
    store = Store(config.blacklist.state)
    states = {i["kind"]: i["state"] for i in store.listings(closed_limit=5)[0]["outbox"]}
    assert states == {
        "ticket_open": "cancelled",
        "removal_mail": "cancelled",
        "listed_notice": "sent",
        "delisted_notice": "sent",
    }


def test_without_mailbox_or_ticket_url_only_the_state_records(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    config = parse_config(
        {
            "gateway": {"hostname": "gw1.example.net"},
            "spam": {"enabled": False},
            "blacklist": {
                "addresses": [GOOD],
                "state": str(tmp_path / "state.sqlite"),
                "zones": [{"zone": "major.test", "major": True}],
            },
        }
    )
    notifier = FakeNotifier()
    resolver.list(GOOD, "major.test")
    assert check(config, notifier, Clock()).exit_code == CRITICAL
    assert notifier.mails == [] and notifier.posts == []
    assert len(Store(config.blacklist.state).listings(open_only=True)) == 1


# --- state ------------------------------------------------------------------------------------


def test_every_check_and_result_is_recorded(tmp_path: Path, resolver: FakeResolver) -> None:
    config, clock = make_config(tmp_path), Clock()
    resolver.list(GOOD, "major.test")
    check(config, FakeNotifier(), clock)
    clock.advance(hours=1)
    check(config, FakeNotifier(), clock)
    store = Store(config.blacklist.state)
    snapshot = status_snapshot(store, history=5, checks=5)
    assert [c["exit_code"] for c in snapshot["checks"]] == [CRITICAL, CRITICAL]
    assert [c["started_at"] for c in snapshot["checks"]] == [
        "2026-11-27T05:00:00Z",
        "2026-11-27T04:00:00Z",
    ]
    results = store.results(snapshot["checks"][0]["id"])
    assert len(results) == 4
    assert {(r["ip"], r["zone"], r["status"]) for r in results if r["status"] == "listed"} == {
        (GOOD, "major.test", "listed")
    }


def test_one_open_listing_per_address_and_zone_is_enforced_by_the_database(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    config = make_config(tmp_path)
    resolver.list(GOOD, "major.test")
    check(config, FakeNotifier(), Clock())
    store = Store(config.blacklist.state)
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute(
            "INSERT INTO listings(ip, zone, list_name, major, codes, meaning, reason, opened_at, "
            "last_seen_at, opened_check) VALUES (?, 'major.test', 'x', 1, '', '', '', 'x', 'x', 1)",
            (GOOD,),
        )


def test_a_second_run_waits_for_the_lock_then_gives_up(tmp_path: Path) -> None:
    first, second = Store(tmp_path / "s.sqlite"), Store(tmp_path / "s.sqlite")
    with (
        first.lock(),
        pytest.raises(StateError, match="another check holds"),
        second.lock(wait=0.3),
    ):
        pass
    with second.lock(wait=0.3):  # released: the next run gets it
        pass


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).db.execute("PRAGMA user_version=99")
    with pytest.raises(StateError, match="newer than this smg knows"):
        Store(path)


def test_unwritable_state_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateError, match="state database"):
        Store(blocker / "state.sqlite")
