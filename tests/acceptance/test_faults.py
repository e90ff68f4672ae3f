"""Faults on the deployed lab fleet. After each: nothing that got a 250 is lost, nothing left
from the wrong IP (ham from a good gateway, spam only from otc-de-mta03), nothing went in
clear text under a forced-TLS rule, and the fleet serves again.

Retries after an outage: the lab relays keep the production retry schedule (first retry
after 5 min), so the tests do what the runbook says once the cause is fixed, ``smg queue
flush``, instead of waiting for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from bench.fleet import mail
from bench.fleet.load import Fleet as LoadFleet
from bench.fleet.load import LoadPlan, LoadRun, format_summary
from bench.fleet.sink import CustomerMailServer
from lab import farend as lab_farend
from lab.config import host_by_name
from tests.acceptance.lab_fleet import (
    Fleet,
    Gateway,
    lab_locked,
    record,
    restart_gateway_host,
    wait_for,
)

pytestmark = pytest.mark.lab

SENDER = "alice@customer-a.example"
TLS_DOMAIN, PLAIN_DOMAIN = "partner-tls.example", "partner-plain.example"
HOST_UNITS = (
    "smg.service", "clamav-daemon.service", "rspamd.service", "nftables.service",
    "smg-blacklist.timer",
)  # fmt: skip


def send_tagged(
    fleet: Fleet, gateway: Gateway, kind: str, domain: str, count: int, prefix: str
) -> list[str]:
    """``count`` messages of ``kind`` via ``gateway``, each accepted (250); their tags."""
    tags = []
    for _ in range(count):
        tag = mail.new_tag(prefix)
        sent = fleet.send(gateway, kind, tag, SENDER, f"{tag}@{domain}")
        assert sent.accepted, sent.transcript
        tags.append(tag)
    return tags


def assert_delivered(fleet: Fleet, tags: list[str], ips: set[str], timeout: float = 90) -> None:
    """Every tag arrived, only from ``ips``, without the verdict header, and with TLS at
    mx-tls (customer-a.example -> partner-tls.example is a forced-TLS pair)."""
    missing = fleet.mailboxes.wait_for(tags, timeout=timeout)
    assert not missing, f"lost: {sorted(missing)}\n{fleet.diagnostics()}"
    for tag in tags:
        for copy in fleet.mailboxes.tagged(tag):
            assert copy.client_address in ips, f"{tag} left from {copy.client_address}"
            assert not copy.has_verdict_header, tag
            if copy.server == "mx-tls":
                assert copy.tls_protocol, f"{tag} went in clear text under a forced-TLS rule"


def queued_tags(gateway: Gateway, tags: list[str]) -> set[str]:
    """The tags (recipient local parts) still in the gateway's queue."""
    waiting = set()
    for message in gateway.queue():
        for rcpt in message["recipients"]:
            local = rcpt["address"].partition("@")[0]
            if local in tags:
                waiting.add(local)
    return waiting


def sent_reply(sent: Any, code: str) -> str:
    """The server's reply line containing ``code`` from a swaks transcript."""
    lines = [line for line in sent.transcript.splitlines() if code in line]
    return lines[0].lstrip("<*~- ").strip() if lines else "?"


def load_in_background(
    fleet: Fleet, customer_mail: CustomerMailServer, plan: LoadPlan
) -> tuple[LoadRun, threading.Thread]:
    run = LoadRun(plan, LoadFleet(fleet.state), customer_mail.maildir)
    thread = threading.Thread(target=run.send, name="load", daemon=True)
    thread.start()
    return run, thread


def finish_load(run: LoadRun, thread: threading.Thread, timeout: float) -> dict[str, Any]:
    thread.join(timeout)
    assert not thread.is_alive(), "the load did not finish in time"
    summary = run.check()
    print(format_summary(summary))
    checks = summary["checks"]
    assert checks["missing"] == 0, summary["examples"]
    assert checks["wrong_ip"] == 0, summary["examples"]
    assert checks["verdict_header_leaked"] == 0
    assert checks["cleartext_under_rule"] == 0
    assert checks["refused_but_arrived"] == 0
    return summary


@contextmanager
def far_end_down(name: str) -> Iterator[None]:
    """The far end's Postfix stopped for the duration; the lab's lock is held meanwhile, so
    a concurrent ``python -m lab up`` does not mistake the fleet for broken and clean it up."""
    host = host_by_name(name)
    with lab_locked():
        lab_farend.stop(host)
        try:
            yield
        finally:
            lab_farend.start(host)
            lab_farend.wait_ready(host)


def test_relay_killed_with_sigkill_under_load(
    fleet: Fleet, customer_mail: CustomerMailServer
) -> None:
    """SIGKILL to smg on otc-de-mta01 while the customer sends over 8 sessions to both good
    gateways: systemd restarts it; every message that got a 250 arrives (from a good IP,
    spam from the bad one); sessions cut by the kill are retried by the client."""
    victim = fleet.gateways["otc-de-mta01"]
    restarts = victim.restarts()
    plan = LoadPlan(
        messages=800, connections=8, gateways=[g.address for g in fleet.good],
        netns=fleet.netns, send_timeout=240, arrival_timeout=180,
    )  # fmt: skip
    run, thread = load_in_background(fleet, customer_mail, plan)
    wait_for("150 messages accepted", lambda: run.accepted() >= 150, 120, 0.1)
    killed_at = time.monotonic()
    # kill -9 of the main PID: `systemctl kill` fails on cgroup v1 inside systemd-nspawn.
    victim.check(f"kill -KILL {victim.main_pid()}")
    wait_for("systemd to restart smg", lambda: victim.restarts() > restarts, 30, 0.2)
    wait_for("SMTP after the restart", lambda: victim.smtp_ready(fleet.netns), 30, 0.2)
    back_after = time.monotonic() - killed_at
    summary = finish_load(run, thread, 300)
    results = summary["results"]
    assert results.get("accepted", 0) + results.get("rejected", 0) == plan.messages, results
    record(
        "sigkill under load",
        f"relay back (220) {back_after:.1f} s after SIGKILL; {plan.messages} sent, "
        f"{results}, retried {summary['retried']}, lost {summary['checks']['missing']}, "
        f"duplicates {summary['checks']['duplicates']}, wrong IP {summary['checks']['wrong_ip']}",
    )


def test_gateway_host_restart_keeps_its_queue(fleet: Fleet) -> None:
    """Mail waiting in otc-de-mta02's queue (its far end is down) survives a reboot of the
    host; the relay, scanners and firewall come back by themselves (every unit that was
    active before is active again); meanwhile the customer sends through otc-de-mta01."""
    host, other = fleet.gateways["otc-de-mta02"], fleet.gateways["otc-de-mta01"]
    units = [u for u in HOST_UNITS if host.is_active(u)]
    assert {"smg.service", "clamav-daemon.service", "rspamd.service"} <= set(units), units
    with far_end_down("mx-plain"):
        waiting = send_tagged(fleet, host, "ham", PLAIN_DOMAIN, 5, "reboot")
        wait_for("the deferrals", lambda: queued_tags(host, waiting) == set(waiting), 30)
        started = time.monotonic()
        ssh_back = restart_gateway_host(host.name)
        meanwhile = send_tagged(fleet, other, "ham", TLS_DOMAIN, 2, "while-reboot")
        for unit in units:
            host.wait_active(unit, 60)
        wait_for("SMTP after the reboot", lambda: host.smtp_ready(fleet.netns), 60, 0.5)
        smtp_back = time.monotonic() - started
        assert queued_tags(host, waiting) == set(waiting), "the queue survived the reboot"
    record(
        "gateway host restart",
        f"{host.name}: sshd back {ssh_back:.1f} s, SMTP 220 back {smtp_back:.1f} s after "
        f"`systemctl reboot`; units back: {', '.join(units)}; 5 queued messages kept",
    )
    host.flush()
    assert_delivered(fleet, waiting, {host.address})
    assert_delivered(fleet, meanwhile, {other.address})
    after = send_tagged(fleet, host, "ham", TLS_DOMAIN, 1, "after-reboot")
    assert_delivered(fleet, after, {host.address})


@pytest.mark.parametrize(
    ("name", "units", "reply"),
    [
        ("otc-de-mta01", ("clamav-daemon.socket", "clamav-daemon.service"), "451 4.7.0"),
        ("otc-de-mta02", ("rspamd.service",), "451 4.7.0"),
    ],
    ids=["clamd", "rspamd"],
)
def test_scanner_stopped_is_a_451_then_recovers(
    fleet: Fleet, name: str, units: tuple[str, ...], reply: str
) -> None:
    """No message is accepted unscanned: 451 (the client keeps it and retries), the other
    gateway keeps accepting; once the scanner is back, mail flows again."""
    gateway = fleet.gateways[name]
    other = next(g for g in fleet.good if g is not gateway)
    present = [u for u in units if gateway.run(f"systemctl cat {u}").rc == 0]
    refused_tag = mail.new_tag("scanner-down")
    try:
        for unit in present:
            gateway.systemctl("stop", unit)
        sent = fleet.send(gateway, "ham", refused_tag, SENDER, f"{refused_tag}@{PLAIN_DOMAIN}")
        assert sent.said(reply) and not sent.accepted, sent.transcript
        meanwhile = send_tagged(fleet, other, "ham", PLAIN_DOMAIN, 1, "other-gateway")
    finally:
        restarted = time.monotonic()
        for unit in reversed(present):
            gateway.systemctl("start", unit)
    for unit in present:
        gateway.wait_active(unit, 60)

    def accepted_again() -> list[str] | None:
        tag = mail.new_tag("scanner-back")
        sent = fleet.send(gateway, "ham", tag, SENDER, f"{tag}@{PLAIN_DOMAIN}")
        return [tag] if sent.accepted else None

    back = wait_for("the gateway to accept again", accepted_again, 90, 1)
    record(
        f"{units[-1].removesuffix('.service')} stopped on {name}",
        f"'{sent_reply(sent, reply)}' while down; accepting again "
        f"{time.monotonic() - restarted:.1f} s after the start",
    )
    assert_delivered(fleet, meanwhile, {other.address})
    assert_delivered(fleet, back, {gateway.address})
    time.sleep(1)
    assert not fleet.mailboxes.tagged(refused_tag), "a 451'd message must not be delivered"


def test_far_end_down_then_delivered(fleet: Fleet) -> None:
    """mx-tls down: ham from both good gateways and spam via the bad gateway wait in the
    queues (deferred, nothing in clear); once it is back, all of it arrives, with TLS."""
    good1, good2 = fleet.good
    with far_end_down("mx-tls"):
        ham = send_tagged(fleet, good1, "ham", TLS_DOMAIN, 2, "farend-ham")
        ham += send_tagged(fleet, good2, "ham", TLS_DOMAIN, 2, "farend-ham")
        spam = send_tagged(fleet, good1, "spam", TLS_DOMAIN, 2, "farend-spam")
        wait_for("ham deferred", lambda: queued_tags(good1, ham) | queued_tags(good2, ham), 30)
        wait_for("spam waiting on the bad gateways",
                 lambda: set().union(*(queued_tags(b, spam) for b in fleet.bads)), 60)  # fmt: skip
        assert not fleet.mailboxes.tagged(ham[0]) and not fleet.mailboxes.tagged(spam[0])
    flushed = time.monotonic()
    for gateway in fleet.gateways.values():
        gateway.flush()
    assert_delivered(fleet, ham, fleet.good_ips)
    assert_delivered(fleet, spam, fleet.bad_ips)
    record(
        "far end mx-tls down",
        f"{len(ham)} ham deferred on the good gateways, {len(spam)} spam on the bad one; all "
        f"delivered with TLS {time.monotonic() - flushed:.1f} s after the flush",
    )


def test_bad_gateway_down_spam_waits_on_the_good_gateways(fleet: Fleet) -> None:
    """Every bad gateway's relay stopped: ham still leaves from the good gateways, spam waits
    in their queues and never leaves from a good IP; once otc-de-mta03 is back, the spam goes
    out via otc-de-mta03 (the other still down)."""
    good, bad = fleet.gateways["otc-de-mta01"], fleet.bad
    for gateway in fleet.bads:
        gateway.systemctl("stop", "smg.service")
    try:
        spam = send_tagged(fleet, good, "spam", PLAIN_DOMAIN, 3, "bad-down-spam")
        ham = send_tagged(fleet, good, "ham", PLAIN_DOMAIN, 2, "bad-down-ham")
        assert_delivered(fleet, ham, {good.address})
        wait_for("the spam deferred", lambda: queued_tags(good, spam) == set(spam), 30)
        waiting = [m for m in good.queue() if m["route"] == "bad_gateway"]
        assert waiting, "rerouted spam waits for the bad gateway"
        time.sleep(2)
        assert not any(fleet.mailboxes.tagged(t) for t in spam), "no spam from a good IP"
    finally:
        bad.systemctl("start", "smg.service")
    wait_for("the bad gateway to listen", bad.listening, 60, 0.5)
    flushed = time.monotonic()
    good.flush()
    try:
        assert_delivered(fleet, spam, {bad.address})
    finally:
        for gateway in fleet.bads[1:]:
            gateway.systemctl("start", "smg.service")
    record(
        "bad gateway down",
        f"{len(spam)} spam waited on {good.name} (route bad_gateway), none left from a good IP; "
        f"delivered via {bad.name} {time.monotonic() - flushed:.1f} s after the flush",
    )
