"""The real fleet's shape on the lab (issue 13): two bad gateways, the second
(otc-de-mta04) behind 1:1 NAT (private 198.51.100.134, public 198.51.100.13: lab/net.py), and
two blacklist monitors, leader with fallback.

- the far end sees the NATed gateway's public address; its relay listens on the private one;
- one bad gateway down: spam leaves through the other; both down: spam waits on the good
  gateways and nothing leaks; one back: the queue drains through it;
- the DNSBL check asks about the public addresses, never the private one;
- the leader monitor powered off at the scheduled time: the fallback notifies, once; with the
  leader up, the fallback records the listing and sends nothing.
"""

from __future__ import annotations

import time

import pytest

from bench.fleet import mail
from bench.fleet.arrivals import Arrival
from lab import dns as lab_dns
from tests.acceptance.lab_fleet import Fleet, gateway_host_down, record, wait_for

pytestmark = pytest.mark.lab

CUSTOMER_A, PLAIN_DOMAIN = "customer-a.example", "partner-plain.example"
NATED, OTHER_BAD = "otc-de-mta04", "otc-de-mta03"
LEADER, FALLBACK = "otc-de-mta01", "otc-de-mta02"
OPERATIONS_MAILBOX = "fmb-change@partner-plain.example"


def send_spam(fleet: Fleet, prefix: str, count: int) -> list[str]:
    tags = []
    for _ in range(count):
        tag = mail.new_tag(prefix)
        sent = fleet.send(fleet.gateways["otc-de-mta01"], "spam", tag, f"alice@{CUSTOMER_A}",
                          f"{tag}@{PLAIN_DOMAIN}")  # fmt: skip
        assert sent.accepted, sent.transcript
        tags.append(tag)
    return tags


def sources(fleet: Fleet, tags: list[str], timeout: float = 90) -> set[str]:
    """The client addresses the far end saw for ``tags`` (each once)."""
    copies = [fleet.arrived(tag, timeout=timeout)[0] for tag in tags]
    return {c.client_address for c in copies}


def test_the_nated_gateway_listens_privately_and_is_seen_publicly(fleet: Fleet) -> None:
    nated = fleet.gateways[NATED]
    assert nated.listen_address == "198.51.100.134" and nated.address == "198.51.100.13"
    assert nated.listening(), "the relay listens on the private address"
    inside = nated.check("ip -4 -o addr show")
    assert "inet 198.51.100.13/" not in inside, f"no public address inside:\n{inside}"
    fleet.gateways[OTHER_BAD].systemctl("stop", "smg.service")
    try:
        tags = send_spam(fleet, "nat-spam", 3)
        assert sources(fleet, tags) == {"198.51.100.13"}, "the far end sees the public address"
    finally:
        fleet.gateways[OTHER_BAD].systemctl("start", "smg.service")
        wait_for("mta03 to listen", fleet.gateways[OTHER_BAD].listening, 60, 0.5)


def test_one_bad_gateway_down_spam_leaves_through_the_other(fleet: Fleet) -> None:
    fleet.gateways[NATED].systemctl("stop", "smg.service")
    try:
        tags = send_spam(fleet, "one-bad-down", 4)
        assert sources(fleet, tags) == {fleet.gateways[OTHER_BAD].address}
    finally:
        fleet.gateways[NATED].systemctl("start", "smg.service")
        wait_for("mta04 to listen", fleet.gateways[NATED].listening, 60, 0.5)


def test_both_bad_gateways_down_spam_waits_and_nothing_leaks(fleet: Fleet) -> None:
    good = fleet.gateways["otc-de-mta01"]
    for bad in fleet.bads:
        bad.systemctl("stop", "smg.service")
    try:
        tags = send_spam(fleet, "both-bad-down", 3)
        wait_for("the spam waiting on mta01", lambda: {
            m["id"] for m in good.queue() if m["route"] == "bad_gateway"
        } and len([m for m in good.queue() if m["route"] == "bad_gateway"]) >= 3, 60)  # fmt: skip
        time.sleep(3)
        assert not any(fleet.mailboxes.tagged(t) for t in tags), "nothing left the fleet"
        fleet.gateways[NATED].systemctl("start", "smg.service")
        wait_for("mta04 to listen", fleet.gateways[NATED].listening, 60, 0.5)
        started = time.monotonic()
        good.flush()
        assert sources(fleet, tags) == {"198.51.100.13"}, "drained through the one back up"
        record("both bad gateways down", f"{len(tags)} spam waited, none leaked; drained via "
               f"{NATED} {time.monotonic() - started:.1f} s after the flush")  # fmt: skip
    finally:
        for bad in fleet.bads:
            bad.systemctl("start", "smg.service")
        for bad in fleet.bads:
            wait_for(f"{bad.name} to listen", bad.listening, 60, 0.5)


def test_the_dnsbl_check_uses_the_public_addresses(fleet: Fleet) -> None:
    config = fleet.gateways[LEADER].check("cat /etc/smg/smg.toml")
    block = config.split("[blacklist]", 1)[1].split("\n[", 1)[0]
    assert "198.51.100.13" in block and "198.51.100.134" not in block, block


def listed_notices(fleet: Fleet, ip: str, since: float) -> list[Arrival]:
    def match(a: Arrival) -> bool:
        return (
            a.recipient == OPERATIONS_MAILBOX and "LISTED:" in a.subject.split()[:3]
            and ip in a.subject and a.path.stat().st_mtime >= since
        )  # fmt: skip

    return fleet.arrivals(match)


def forget_listing(fleet: Fleet) -> None:
    """The delisting seen at once by both monitors (their unbound caches the listing)."""
    for name in (LEADER, FALLBACK):
        fleet.gateways[name].forget_dns(lab_dns.DNSBL_ZONE)


def run_check(fleet: Fleet, name: str) -> None:
    fleet.gateways[name].run("systemctl start smg-blacklist.service", timeout=200)


def test_leader_up_the_fallback_sends_nothing(fleet: Fleet) -> None:
    ip, since = "198.51.100.13", time.time() - 1
    lab_dns.list_ip(ip, reason="acceptance test: leader up")
    try:
        run_check(fleet, LEADER)
        run_check(fleet, FALLBACK)  # waits the head start, finds the leader up
        wait_for("the leader's notice", lambda: listed_notices(fleet, ip, since), 90)
        time.sleep(5)
        notices = listed_notices(fleet, ip, since)
        assert len(notices) == 1, notices
        assert notices[0].client_address == fleet.gateways[LEADER].address
        journal = fleet.gateways[FALLBACK].journal("smg-blacklist.service", lines=20)
        assert "is up and notifies: recording only" in journal, journal
    finally:
        lab_dns.unlist_ip(ip)
    forget_listing(fleet)
    run_check(fleet, LEADER)
    run_check(fleet, FALLBACK)


def test_leader_down_at_the_scheduled_time_the_fallback_notifies_once(fleet: Fleet) -> None:
    ip, since = fleet.gateways[OTHER_BAD].address, time.time() - 1
    lab_dns.list_ip(ip, reason="acceptance test: leader down")
    try:
        with gateway_host_down(LEADER):
            started = time.monotonic()
            run_check(fleet, FALLBACK)  # what its timer starts at 05:00
            notice = wait_for("the fallback's notice", lambda: listed_notices(fleet, ip, since), 90)
            took = time.monotonic() - started
            time.sleep(5)
            notices = listed_notices(fleet, ip, since)
            assert len(notices) == 1, notices
            assert notice[0].client_address == fleet.gateways[FALLBACK].address
        record("blacklist leader down", f"the fallback notified once, {took:.0f} s after its "
               "start (head start 10 s in the lab, 900 s in production)")  # fmt: skip
    finally:
        lab_dns.unlist_ip(ip)
    wait_for(f"{LEADER} to listen", fleet.gateways[LEADER].listening, 120, 1)
    forget_listing(fleet)
    run_check(fleet, FALLBACK)  # closes its listing (the leader is up again: recording only)
