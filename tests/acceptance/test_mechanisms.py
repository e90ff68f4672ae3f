"""Every mechanism of the service description, end to end on the deployed lab fleet.

Mail goes in from the customer host (swaks in ``smglab-customer``, 198.51.100.30) at a good
gateway and is looked at where it comes out: at the far-end Postfix servers (which record the
connecting address and the TLS protocol) and at the customer's own mail server (NDRs).
docs/acceptance.md maps each sentence of the service description to these tests.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.fleet import mail
from bench.fleet.arrivals import Arrival
from bench.fleet.smtp import banner_from
from lab import dns as lab_dns
from lab import farend as lab_farend
from lab.config import host_by_name
from tests.acceptance.lab_fleet import Fleet, Gateway, lab_locked, wait_for
from tests.integration.test_dkim import mail_dkim_verify, opendkim_verify

pytestmark = pytest.mark.lab

CUSTOMER_A, CUSTOMER_B = "customer-a.example", "customer-b.example"
TLS_DOMAIN, PLAIN_DOMAIN = "partner-tls.example", "partner-plain.example"
FAR_END = {TLS_DOMAIN: "mx-tls", PLAIN_DOMAIN: "mx-plain"}
GOOD = ["otc-de-mta01", "otc-de-mta02"]


def only_copy(fleet: Fleet, tag: str, timeout: float = 60) -> Arrival:
    """The one copy of ``tag`` (a second one after a short grace would be a duplicate)."""
    (first,) = fleet.arrived(tag, timeout=timeout)
    time.sleep(0.5)
    copies = fleet.mailboxes.tagged(tag)
    assert len(copies) == 1, f"{tag} arrived {len(copies)} times: {copies}"
    return first


def postfix_saw(far_end: str, address: str) -> bool:
    """The far end's Postfix logged a connection from ``address``."""
    return address in lab_farend.connected_clients(far_end)


def maillog_mark(fleet: Fleet, far_end: str) -> int:
    """Where the far end's maillog ends now (read from here on with ``sessions_since``)."""
    return Path(fleet.state["far_ends"][far_end]["maillog"]).stat().st_size


def sessions_since(fleet: Fleet, far_end: str, mark: int, address: str) -> list[str]:
    """The far end's ``disconnect from ...[address] ehlo=1 ...`` lines after ``mark``: what
    each SMTP session of that client did (Postfix counts every command it received)."""
    with open(fleet.state["far_ends"][far_end]["maillog"], "rb") as log:
        log.seek(mark)
        text = log.read().decode(errors="replace")
    return [
        line for line in text.splitlines() if "disconnect from" in line and f"[{address}]" in line
    ]


def ndr_for(fleet: Fleet, sender: str, timeout: float = 60) -> Arrival:
    """The NDR the customer's mail server received for ``sender``."""
    return fleet.wait_arrival(
        f"an NDR to {sender}",
        lambda a: a.server == "customer" and a.recipient == sender and a.sender == "",
        timeout,
    )


# --- Good / Bad gateway ---------------------------------------------------------------------


@pytest.mark.parametrize("domain", [TLS_DOMAIN, PLAIN_DOMAIN])
@pytest.mark.parametrize("name", GOOD)
def test_ham_leaves_from_the_good_gateway_that_took_it(fleet: Fleet, name: str, domain: str):
    gateway = fleet.gateways[name]
    tag = mail.new_tag("ham")
    sender, rcpt = f"alice@{CUSTOMER_A}", f"{tag}@{domain}"
    sent = fleet.send(gateway, "ham", tag, sender, rcpt)
    assert sent.accepted, sent.transcript
    copy = only_copy(fleet, tag)
    assert copy.server == FAR_END[domain] and copy.recipient == rcpt
    assert copy.client_address == gateway.address, "ham leaves from the good gateway's own IP"
    assert postfix_saw(FAR_END[domain], gateway.address)
    assert not copy.has_verdict_header
    assert copy.has_dkim_signature
    if domain == TLS_DOMAIN:  # customer-a -> partner-tls is a forced-TLS pair (verify)
        assert copy.tls_protocol in ("TLSv1.2", "TLSv1.3"), copy


@pytest.mark.parametrize("name", GOOD)
def test_spam_leaves_from_the_bad_gateway_without_the_verdict_header(
    fleet: Fleet, name: str, tmp_path: Path
) -> None:
    gateway = fleet.gateways[name]
    tag = mail.new_tag("spam")
    sender, rcpt = f"alice@{CUSTOMER_A}", f"{tag}@{PLAIN_DOMAIN}"
    sent = fleet.send(gateway, "spam", tag, sender, rcpt)
    assert sent.accepted, sent.transcript
    copy = only_copy(fleet, tag)
    assert copy.client_address in fleet.bad_ips, "spam leaves only from a bad gateway's IP"
    assert postfix_saw("mx-plain", copy.client_address)
    assert not copy.has_verdict_header, "the internal verdict header never leaves the fleet"
    assert mail.GTUBE in copy.read().decode(errors="replace")
    # Signed on the good gateway before the reroute; the bad gateway keeps it intact.
    assert opendkim_verify(copy.read(), fleet.dns_server, CUSTOMER_A, tmp_path) == {"lab": "pass"}


def test_ndr_from_the_bad_gateway_tells_the_customer_why_it_was_spam(fleet: Fleet) -> None:
    """Spam to a recipient the far end refuses: the bad gateway sends the NDR to the customer,
    and it says why the mail was classified as spam (what the customer should check)."""
    tag = mail.new_tag("spam-ndr")
    sender, rcpt = f"{tag}@{CUSTOMER_A}", f"reject-{tag}@{PLAIN_DOMAIN}"
    sent = fleet.send(fleet.gateways["otc-de-mta01"], "spam", tag, sender, rcpt)
    assert sent.accepted, sent.transcript
    ndr = ndr_for(fleet, sender)
    assert ndr.client_address in fleet.bad_ips, "the NDR comes from a bad gateway"
    text = ndr.read().decode(errors="replace")
    assert "classified as spam" in text and "GTUBE" in text, text[:3000]
    assert "550 5.1.1" in text and rcpt in text


# --- Virus check ----------------------------------------------------------------------------


def test_virus_is_refused_with_554_and_the_sender_gets_an_ndr(fleet: Fleet) -> None:
    gateway = fleet.gateways["otc-de-mta01"]
    tag = mail.new_tag("virus")
    sender, rcpt = f"{tag}@{CUSTOMER_A}", f"{tag}@{TLS_DOMAIN}"
    sent = fleet.send(gateway, "virus", tag, sender, rcpt)
    assert sent.said("554 5.7.1 Virus found"), sent.transcript
    assert not sent.accepted
    info = ndr_for(fleet, sender)
    assert info.client_address in fleet.good_ips  # the customer's MX got it from the fleet
    text = info.read().decode(errors="replace")
    assert "contains a virus" in text and f"<{tag}@{CUSTOMER_A}>" in text, text[:2000]
    assert mail.EICAR not in text, "the infected content never goes back out"
    assert not [a for a in fleet.mailboxes.tagged(tag) if a.server != "customer"]


# --- Sender domain check --------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["gone.customer-a.example", "quiet.customer-a.example"])
def test_sender_domain_must_resolve(fleet: Fleet, domain: str) -> None:
    """A domain of customer-a's own (it owns .customer-a.example) that has no such name, or
    only a TXT record: the sender domain check answers (a domain of no customer would get the
    sender binding's 550 5.7.1 first, test_tenants)."""
    tag = mail.new_tag("nodomain")
    rcpt = f"{tag}@{PLAIN_DOMAIN}"
    sent = fleet.send(fleet.gateways["otc-de-mta02"], "ham", tag, f"alice@{domain}", rcpt)
    assert sent.said("550 5.1.8 Sender Domain must resolve"), sent.transcript
    assert all(not g.queued_for(rcpt) for g in fleet.good)


def test_sender_domain_with_only_an_a_record_is_accepted(fleet: Fleet) -> None:
    tag = mail.new_tag("a-only")  # (customer-b -> partner-plain would be a forced-TLS pair)
    sent = fleet.send(
        fleet.gateways["otc-de-mta02"], "ham", tag, f"bob@{CUSTOMER_B}", f"{tag}@{TLS_DOMAIN}"
    )
    assert sent.accepted, sent.transcript
    assert only_copy(fleet, tag).client_address == fleet.gateways["otc-de-mta02"].address


# --- Forced TLS -----------------------------------------------------------------------------


def test_forced_tls_hold_waits_for_tls_and_never_goes_in_clear(fleet: Fleet) -> None:
    """Rule customer-a.example -> partner-tls.example: verify, on failure hold (lab inventory).
    The partner's server loses STARTTLS: the message is held, nothing goes in clear; the
    server gets TLS back, the operator releases the message: delivered, TLS verified."""
    gateway = fleet.gateways["otc-de-mta01"]
    tag = mail.new_tag("hold")
    sender, rcpt = f"alice@{CUSTOMER_A}", f"{tag}@{TLS_DOMAIN}"
    with far_end_without_tls("mx-tls"):
        mark = maillog_mark(fleet, "mx-tls")
        sent = fleet.send(gateway, "ham", tag, sender, rcpt)
        assert sent.accepted, sent.transcript
        held = wait_for(
            "the message to be held for TLS",
            lambda: [m for m in gateway.queued_for(rcpt) if m["state"] == "held"],
            60,
        )
        assert held[0]["hold_reason"] == "tls", held
        assert_no_mail_command(fleet, "mx-tls", mark, gateway)
        assert not fleet.mailboxes.tagged(tag), "nothing may arrive in clear text"
    gateway.release(held[0]["id"])
    copy = only_copy(fleet, tag)
    assert copy.server == "mx-tls" and copy.tls_protocol in ("TLSv1.2", "TLSv1.3")
    assert copy.client_address == gateway.address
    wait_for("the queue entry to go", lambda: not gateway.queued_for(rcpt), 30)


@contextmanager
def far_end_without_tls(name: str) -> Iterator[None]:
    """The far end's Postfix restarted without STARTTLS (``smtpd_tls_security_level = none``),
    and with it again (``may``) afterwards. A restart, not a reload, so that no session the
    gateways keep open from before goes on with TLS. Holds the lab's lock meanwhile."""
    host = host_by_name(name)

    def restart_with(level: str) -> None:
        lab_farend.stop(host)
        setting = f"smtpd_tls_security_level = {level}"
        postconf = ["postconf", "-c", str(lab_farend.config_dir(host)), "-e", setting]
        subprocess.run(postconf, check=True, timeout=30)
        lab_farend.start(host)
        lab_farend.wait_ready(host)

    with lab_locked():
        restart_with("none")
        try:
            yield
        finally:
            restart_with("may")


def test_forced_tls_reject_bounces_with_ndr_and_never_goes_in_clear(fleet: Fleet) -> None:
    """Rule customer-b.example -> partner-plain.example: encrypt, on failure reject. The far
    end offers no STARTTLS: an NDR (5.7.10) at once, nothing in clear; then the intake
    refuses the pair at RCPT while it remembers the failure."""
    gateway = fleet.gateways["otc-de-mta02"]
    tag = mail.new_tag("reject")
    sender, rcpt = f"{tag}@{CUSTOMER_B}", f"{tag}@{PLAIN_DOMAIN}"
    mark = maillog_mark(fleet, "mx-plain")
    sent = fleet.send(gateway, "ham", tag, sender, rcpt)
    if not sent.accepted:  # an earlier run's failure is still remembered: refused at RCPT
        assert sent.said("550 5.7.10"), sent.transcript
    else:
        ndr = ndr_for(fleet, sender)
        text = ndr.read().decode(errors="replace")
        assert "5.7.10" in text, text[:2000]
        assert_no_mail_command(fleet, "mx-plain", mark, gateway)
        again = fleet.send(gateway, "ham", mail.new_tag("reject2"), sender, rcpt)
        assert again.said("550 5.7.10"), again.transcript
    assert not fleet.mailboxes.tagged(tag), "nothing may arrive in clear text"


def assert_no_mail_command(fleet: Fleet, far_end: str, mark: int, gateway: Gateway) -> None:
    """The gateway connected to the far end without TLS and said EHLO, then nothing: not
    even the envelope (MAIL FROM) went in clear text."""
    sessions = wait_for(
        f"{gateway.name}'s session at {far_end}",
        lambda: sessions_since(fleet, far_end, mark, gateway.address),
        30,
    )
    assert all(" mail=" not in line for line in sessions), sessions


# --- DKIM -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "algorithm"), [(CUSTOMER_A, "rsa"), (CUSTOMER_B, "ed25519")], ids=["rsa", "ed25519"]
)
def test_dkim_signature_verifies_at_the_far_end(
    fleet: Fleet, domain: str, algorithm: str, tmp_path: Path
) -> None:
    tag = mail.new_tag(f"dkim-{algorithm}")
    sent = fleet.send(
        fleet.gateways["otc-de-mta01"], "ham", tag, f"carol@{domain}", f"{tag}@{TLS_DOMAIN}"
    )
    assert sent.accepted, sent.transcript
    raw = only_copy(fleet, tag).read()
    assert opendkim_verify(raw, fleet.dns_server, domain, tmp_path / "opendkim") == {"lab": "pass"}
    if algorithm == "rsa":  # Debian's Mail::DKIM has no Ed25519
        assert mail_dkim_verify(raw, fleet.dns_server, tmp_path / "perl") == {"lab": "pass"}


# --- Who may connect ------------------------------------------------------------------------


def test_bad_gateway_refuses_a_direct_connection_from_the_customer(fleet: Fleet) -> None:
    said = banner_from(fleet.netns, fleet.bad.address, timeout=3)
    assert not said.startswith("220"), f"the bad gateway greeted the customer: {said}"


def test_good_gateway_refuses_a_stranger(fleet: Fleet) -> None:
    """A host outside the customer networks (here: the mx-plain namespace) gets no SMTP."""
    for gateway in fleet.good:
        said = banner_from(fleet.far_end_ns("mx-plain"), gateway.address, timeout=3)
        assert not said.startswith("220"), f"{gateway.name} greeted a stranger: {said}"


# --- Blacklist monitoring -------------------------------------------------------------------

OPERATIONS_MAILBOX = "fmb-change@partner-plain.example"  # the lab inventory's mailbox


def monitor_host(fleet: Fleet) -> Gateway:
    """The leader: the first of the monitor hosts (the others are its fallbacks)."""
    hosts = [g for g in fleet.gateways.values() if g.is_active("smg-blacklist.timer")]
    assert hosts, "no host with the blacklist timer"
    return sorted(hosts, key=lambda g: g.name)[0]


def blacklist_listings(gateway: Gateway, ip: str) -> tuple[list[dict], list[dict]]:
    """(open listings, closed listings) of ``ip`` from ``smg blacklist status --json``."""
    result = gateway.smg("blacklist status --json --config /etc/smg/smg.toml")
    assert result.rc == 0, result.stderr
    status = json.loads(result.stdout)
    return (
        [x for x in status["open_listings"] if x["ip"] == ip],
        [x for x in status["history"] if x["ip"] == ip],
    )


def notice(fleet: Fleet, what: str, ip: str, since: float) -> Arrival:
    def match(a: Arrival) -> bool:
        words = a.subject.split()
        return (
            a.recipient == OPERATIONS_MAILBOX and what in words[:3] and ip in a.subject
            and a.path.stat().st_mtime >= since
        )  # fmt: skip

    return fleet.wait_arrival(f"the {what} notice for {ip}", match, timeout=90)


def test_blacklist_listing_notifies_operations_and_tracks_the_removal(fleet: Fleet) -> None:
    """A gateway IP listed in the lab DNSBL: the check (the unit the 05:00 timer starts) mails
    the operations mailbox and opens a removal request; once delisted, the next check closes
    it and says so."""
    monitor, listed = monitor_host(fleet), fleet.bad
    since = time.time() - 1
    lab_dns.list_ip(listed.address, reason="acceptance test: spam trap hit")
    try:
        monitor.systemctl("start", "smg-blacklist.service", timeout=180)
        listed_notice = notice(fleet, "LISTED:", listed.address, since)
        assert listed_notice.client_address == monitor.address
        assert "major list" in listed_notice.subject
        opened, _ = blacklist_listings(monitor, listed.address)
        assert len(opened) == 1 and opened[0]["request_id"], opened
        assert opened[0]["request_closed_at"] is None, "the removal request is open"
    finally:
        lab_dns.unlist_ip(listed.address)
    monitor.forget_dns(lab_dns.DNSBL_ZONE)  # else the listing is cached for its TTL
    monitor.systemctl("start", "smg-blacklist.service", timeout=180)
    notice(fleet, "DELISTED:", listed.address, since)
    still_open, closed = blacklist_listings(monitor, listed.address)
    assert not still_open
    assert closed and closed[0]["request_id"] == opened[0]["request_id"]
    assert closed[0]["closed_at"] and closed[0]["request_closed_at"], closed[0]
