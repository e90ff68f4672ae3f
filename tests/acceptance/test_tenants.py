"""Customers (tenants, issue 11) on the deployed lab fleet: what one customer can do to another.

The lab inventory has customer-a (the customer host, 198.51.100.30), customer-b (its own host,
198.51.100.31), customer-c (AUTH only, from auth_networks 198.51.100.40/29: host .41) and a
host of no customer (``stranger``, .35).  The limit and suspension tests tighten customer-a's
limits on one gateway for their duration (its smg.toml rewritten and the relay restarted,
the deployed file put back after), so the other modules keep the lab inventory's limits.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator

import pytest
import tomli_w

from bench.fleet import mail
from bench.fleet.smtp import RawSmtp
from lab.config import REPO_DIR
from tests.acceptance.lab_fleet import CONFIG, RELAY_UNIT, Fleet, Gateway, wait_for

pytestmark = pytest.mark.lab

A, B, C = "customer-a.example", "customer-b.example", "customer-c.example"
PLAIN = "partner-plain.example"
LAB_CUSTOMER_C_PASSWORD = "lab-customer-c-relay"  # its hash is in inventories/lab.py
OPS_MAILBOX = "fmb-change@partner-plain.example"  # the lab inventory's operations_mailbox
AUTH = ["-tls", "--auth", "PLAIN", "--auth-user", f"relay@{C}",
        "--auth-password", LAB_CUSTOMER_C_PASSWORD]  # fmt: skip


def nothing_arrives(fleet: Fleet, tag: str, grace: float = 8) -> None:
    time.sleep(grace)
    assert not fleet.mailboxes.tagged(tag), f"{tag} reached a far end"


def test_a_signing_as_bs_domain_gets_550_and_nothing_leaves(fleet: Fleet) -> None:
    gateway = fleet.good[0]
    tag = mail.new_tag("a-as-b")
    sent = fleet.swaks(gateway, f"{tag}@{B}", f"{tag}@{PLAIN}",
                       mail.build("ham", tag, f"{tag}@{B}", f"{tag}@{PLAIN}"),
                       source="customer")  # fmt: skip
    assert not sent.accepted and sent.said("550 5.7.1"), sent.transcript
    assert "customer-a" in sent.transcript
    nothing_arrives(fleet, tag)


def test_as_mail_is_signed_with_as_key_only(fleet: Fleet) -> None:
    tag = mail.new_tag("a-dkim")
    sent = fleet.send(fleet.good[0], "ham", tag, f"{tag}@{A}", f"{tag}@{PLAIN}")
    assert sent.accepted, sent.transcript
    (copy,) = fleet.arrived(tag)
    head = copy.read().split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].decode(errors="replace")
    signatures = [line for line in head.splitlines() if line.lower().startswith("dkim-signature")]
    assert len(signatures) == 1, head
    assert f"d={A}" in head.replace("\n", "").replace(" ", "").replace("\t", "")


def test_a_host_of_no_customer_gets_554(fleet: Fleet) -> None:
    """The firewall lets only tenant and auth networks reach port 25: the stranger gets no
    greeting at all.  A host the firewall does let in (the other blacklist monitor) but that
    is no customer gets the relay's 554."""
    for gateway in fleet.good:
        with pytest.raises(OSError):
            fleet.raw(gateway, timeout=3, source="stranger").close()
    mta01, mta02 = fleet.gateways["otc-de-mta01"], fleet.gateways["otc-de-mta02"]
    probe = (f"import socket; s = socket.create_connection(('{mta01.address}', 25), timeout=5); "
             "print(s.recv(200).decode())")  # fmt: skip
    banner = mta02.check(f'python3 -c "{probe}"')
    assert banner.startswith("554 5.7.1"), banner


def test_c_over_auth_is_relayed_and_without_auth_refused(fleet: Fleet) -> None:
    gateway = fleet.good[0]
    tag = mail.new_tag("c-auth")
    data = mail.build("ham", tag, f"{tag}@{C}", f"{tag}@{PLAIN}")
    sent = fleet.swaks(gateway, f"{tag}@{C}", f"{tag}@{PLAIN}", data, source="customer-c",
                       extra=AUTH)  # fmt: skip
    assert sent.accepted, sent.transcript
    fleet.arrived(tag)
    tag2 = mail.new_tag("c-noauth")
    refused = fleet.swaks(gateway, f"{tag2}@{C}", f"{tag2}@{PLAIN}",
                          mail.build("ham", tag2, f"{tag2}@{C}", f"{tag2}@{PLAIN}"),
                          source="customer-c", extra=["-tls"])  # fmt: skip
    assert not refused.accepted and refused.said("530"), refused.transcript
    nothing_arrives(fleet, tag2, grace=3)


# --- limits and suspension: customer-a tightened on one gateway ------------------------------


def rewrite_config(gateway: Gateway, text: str) -> None:
    """The relay's config replaced (same file: owner and mode stay), the relay restarted."""
    encoded = base64.b64encode(text.encode()).decode()
    gateway.check(f"echo {encoded} | base64 -d > {CONFIG}")
    gateway.systemctl("restart", RELAY_UNIT)
    wait_for(f"{gateway.name} to listen", gateway.listening, 60, 0.5)


def tightened(fleet: Fleet, name: str, limits: dict[str, object]) -> Iterator[Gateway]:
    gateway = fleet.gateways[name]
    original = gateway.check(f"cat {CONFIG}")
    config = tomllib.loads(original)
    for tenant in config["tenants"]:
        if tenant["name"] == "customer-a":
            tenant["limits"] = {**tenant.get("limits", {}), **limits}
    rewrite_config(gateway, tomli_w.dumps(config))
    try:
        yield gateway
    finally:
        gateway.smg(f"tenant resume customer-a --reason acceptance-cleanup --config {CONFIG}")
        rewrite_config(gateway, original)


@pytest.fixture
def limited(fleet: Fleet) -> Iterator[Gateway]:
    """customer-a on otc-de-mta02: 3 messages an hour, 2 sessions."""
    limits = {"messages_per_hour": 3, "max_sessions": 2, "max_sessions_per_ip": 2}
    yield from tightened(fleet, "otc-de-mta02", limits)


@pytest.fixture
def suspendable(fleet: Fleet) -> Iterator[Gateway]:
    """customer-a on otc-de-mta01: suspended at half spam of at least 4 messages a minute."""
    yield from tightened(fleet, "otc-de-mta01",
                         {"suspend_min_messages": 4, "suspend_spam_share": 0.5,
                          "suspend_window": "1m"})  # fmt: skip


def b_is_accepted(fleet: Fleet, gateway: Gateway) -> None:
    tag = mail.new_tag("b-same-minute")
    # customer-b -> partner-plain is a forced-TLS pair that cannot go: partner-tls (DANE)
    sent = fleet.send(gateway, "ham", tag, f"{tag}@{B}", f"{tag}@partner-tls.example")
    assert sent.accepted, sent.transcript
    fleet.arrived(tag)


def test_as_burst_over_its_hourly_limit_gets_4xx_while_b_is_accepted(
    fleet: Fleet, limited: Gateway
) -> None:
    replies = []
    for _ in range(5):  # the limit is 3 (earlier mail of the hour may count too)
        tag = mail.new_tag("a-burst")
        sent = fleet.send(limited, "ham", tag, f"{tag}@{A}", f"{tag}@{PLAIN}")
        replies.append(sent)
        if sent.said("451 4.7.1"):
            break
    assert replies[-1].said("451 4.7.1"), replies[-1].transcript
    b_is_accepted(fleet, limited)


def test_a_holding_all_its_sessions_does_not_stop_b(fleet: Fleet, limited: Gateway) -> None:
    held: list[RawSmtp] = []
    try:
        for _ in range(2):
            session = fleet.raw(limited)
            held.append(session)
            assert session.banner.code == 220, session.banner
        with fleet.raw(limited) as third:
            assert third.banner.code == 421, third.banner
        b_is_accepted(fleet, limited)
    finally:
        for session in held:
            session.close()


def ops_notices(fleet: Fleet, gateway: Gateway) -> list[object]:
    subject = f"customer customer-a suspended on {gateway.fqdn}"
    return fleet.arrivals(lambda a: a.recipient == OPS_MAILBOX and subject in a.subject)


def test_a_gtube_burst_suspends_a_once_and_resume_lets_a_through(
    fleet: Fleet, suspendable: Gateway
) -> None:
    gateway = suspendable
    before = len(ops_notices(fleet, gateway))
    suspended = None
    for _ in range(12):
        tag = mail.new_tag("a-gtube")
        sent = fleet.send(gateway, "spam", tag, f"{tag}@{A}", f"{tag}@{PLAIN}")
        if sent.said("451 4.7.1"):
            suspended = sent
            break
    assert suspended is not None and "suspended" in suspended.transcript, sent.transcript
    # the operations mailbox is told once, however often A tries meanwhile
    wait_for("the suspension notice", lambda: len(ops_notices(fleet, gateway)) > before, 90, 1)
    tag = mail.new_tag("a-while-suspended")
    again = fleet.send(gateway, "ham", tag, f"{tag}@{A}", f"{tag}@{PLAIN}")
    assert again.said("451 4.7.1"), again.transcript
    time.sleep(5)
    assert len(ops_notices(fleet, gateway)) == before + 1
    # A's spam still queued is held, not sent on
    spam = [m for m in gateway.queue() if "a-gtube-" in m["sender"] and A in m["sender"]]
    assert all(m["state"] == "held" and m["hold_reason"] == "suspended" for m in spam), spam
    done = gateway.smg(f"tenant resume customer-a --reason acceptance --config {CONFIG}")
    assert done.rc == 0, done.stderr
    tag = mail.new_tag("a-resumed")
    sent = fleet.send(gateway, "ham", tag, f"{tag}@{A}", f"{tag}@{PLAIN}")
    assert sent.accepted, sent.transcript
    fleet.arrived(tag)
    for message in spam:
        gateway.smg(f"queue delete {message['id']} --reason acceptance --config {CONFIG}")


def test_the_runbook_suspends_b_on_every_good_gateway_in_one_command(fleet: Fleet) -> None:
    """The compromised-customer runbook (docs/tenants.md): ``python -m deploykit tenant ...
    suspend`` reaches every good gateway; B gets 451 on each, the audit logs name the reason;
    ``resume`` lets B through again everywhere."""

    def fleet_tenant(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deploykit", "tenant", "inventories/lab.py",
                               *args], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=180)  # fmt: skip

    done = fleet_tenant("suspend", "customer-b", "--reason", "acceptance: runbook")
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        for gateway in fleet.good:
            assert f"{gateway.name}: customer-b: suspended" in done.stdout, done.stdout
            tag = mail.new_tag("b-suspended")
            sent = fleet.send(gateway, "ham", tag, f"{tag}@{B}", f"{tag}@partner-tls.example")
            assert sent.said("451 4.7.1") and "suspended" in sent.transcript, sent.transcript
            audit = gateway.check("tail -n 3 /var/spool/smg/audit.log")
            assert "acceptance: runbook (deploykit, by" in audit, audit
        shown = fleet_tenant("show", "customer-b", "--json")
        assert shown.returncode == 0, shown.stderr
        hosts = json.loads(shown.stdout)["hosts"]
        assert {name for name, state in hosts.items() if state["suspended"]} == {
            g.name for g in fleet.good
        }
    finally:
        resumed = fleet_tenant("resume", "customer-b", "--reason", "acceptance: runbook done")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for gateway in fleet.good:
        b_is_accepted(fleet, gateway)
