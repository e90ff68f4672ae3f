"""Delivery by the real ``smg serve`` to real Postfix far ends, with knot DNS serving the MX
records: source address and EHLO seen by the far end, connection reuse, 4xx deferral then
success, 5xx NDR content, lifetime expiry NDR, null MX bounce, MX failover.

Far ends (all on one port, like port 25 on the internet):

- 127.0.22.10 ``mx.customer.dlv.test``: the sender's own MX, where NDRs arrive;
- 127.0.22.11 ``mx.far.dlv.test``: rejects ``reject@`` (550), defers ``later@`` (450);
- 127.0.22.12: nothing listens (first MX of multi.dlv.test);
- 127.0.22.13 ``mx.grey.dlv.test``: defers ``grey@`` until the test lifts it.

The relay sends from 127.0.22.5.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, common_port, wait_for
from tests.harness.postfix import PostfixFarEnd, ReceivedMessage
from tests.harness.swaks import swaks
from tests.integration.smg_relay import SmgRelay, base_config, queued_as

pytestmark = pytest.mark.integration

ZONE = "dlv.test"
SOURCE = "127.0.22.5"
ZONE_TEXT = """
customer        MX 10 mx.customer
mx.customer     A 127.0.22.10
far             MX 10 mx.far
mx.far          A 127.0.22.11
multi           MX 10 mx1.multi
multi           MX 20 mx2.multi
mx1.multi       A 127.0.22.12
mx2.multi       A 127.0.22.11
grey            MX 10 mx.grey
mx.grey         A 127.0.22.13
nullmx          MX 0 .
"""
SENDER = f"alice@customer.{ZONE}"
HOSTNAME = "gw.smg-test.example"


def mail(subject: str, mid: str, to: str) -> str:
    return (
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{mid}@dlv.test>\r\n"
        f"X-SMG-Verdict: ham\r\n\r\nHello from the delivery test.\r\n"
    )


def send(relay: SmgRelay, to: str | list[str], subject: str, mid: str) -> str:
    """Send with swaks; return the queue id from the 250 reply."""
    rcpts = [to] if isinstance(to, str) else to
    result = swaks(relay.endpoint, to=rcpts, mail_from=SENDER, data=mail(subject, mid, rcpts[0]))
    assert result.ok, result.transcript
    return queued_as(result.transcript)


def with_mid(messages: list[ReceivedMessage], mid: str) -> list[ReceivedMessage]:
    return [m for m in messages if f"<{mid}@dlv.test>" in m.raw.decode(errors="replace")]


@pytest.fixture(scope="module")
def port() -> int:
    return common_port("127.0.22.10", "127.0.22.11", "127.0.22.12", "127.0.22.13", SOURCE)


@pytest.fixture(scope="module")
def zone(knot_dns: KnotDNS) -> KnotDNS:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    return knot_dns


def _far_end(address: str, hostname: str, port: int, reject: dict[str, str]) -> PostfixFarEnd:
    require_binaries("postfix")
    daemon = PostfixFarEnd(
        address=address, port=port, hostname=hostname, tls="none", reject_recipients=reject
    )
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def customer(port: int) -> Iterator[PostfixFarEnd]:
    daemon = _far_end("127.0.22.10", f"mx.customer.{ZONE}", port, {})
    yield daemon
    daemon.close()


@pytest.fixture(scope="module")
def far(port: int) -> Iterator[PostfixFarEnd]:
    reject = {
        f"reject@far.{ZONE}": "550 5.1.1 no such user here",
        f"later@far.{ZONE}": "450 4.2.0 mailbox busy, try later",
    }
    daemon = _far_end("127.0.22.11", f"mx.far.{ZONE}", port, reject)
    yield daemon
    daemon.close()


@pytest.fixture(scope="module")
def grey(port: int) -> Iterator[PostfixFarEnd]:
    daemon = _far_end("127.0.22.13", f"mx.grey.{ZONE}", port, {})
    yield daemon
    daemon.close()


def make_relay(tmp: Path, zone: KnotDNS, port: int, **delivery: str) -> SmgRelay:
    require_binaries("swaks")
    config = base_config(tmp, zone.nameserver, hostname=HOSTNAME, source_address=SOURCE)
    config["delivery"] = {
        "port": port,
        "retry_initial": "1s",
        "retry_max": "2s",
        "scan_interval": "200ms",
        "connect_timeout": "2s",
        **delivery,
    }
    relay = SmgRelay(tmp, config)
    relay.start()
    return relay


@pytest.fixture(scope="module")
def relay(zone, port, customer, far, grey, tmp_path_factory) -> Iterator[SmgRelay]:
    relay = make_relay(tmp_path_factory.mktemp("delivery"), zone, port)
    yield relay
    relay.stop()


def defer_recipient(far_end: PostfixFarEnd, rcpt: str | None) -> None:
    """Restart the far end answering 450 to ``rcpt`` (None: accepting everyone).  A restart,
    not a reload, so that no smtpd process still holds the old table; the relay's pooled
    session to it dies with it, which the relay must notice."""
    far_end.reject_recipients = {rcpt: "450 4.7.1 greylisted, try again later"} if rcpt else {}
    far_end.stop()
    far_end.start()


# --- tests -------------------------------------------------------------------------------------


def test_delivered_from_the_source_address_with_the_ehlo_name(relay, far) -> None:
    send(relay, f"bob@far.{ZONE}", "source address", "src-1")
    got = with_mid(far.wait_for_messages(1), "src-1")
    assert got, far.log_tail()
    message = got[0]
    assert message.client_address == SOURCE
    assert message.helo == HOSTNAME
    assert message.mail_from == SENDER and message.rcpt_tos == (f"bob@far.{ZONE}",)
    # The internal verdict header never leaves the fleet on a direct delivery.
    assert b"X-SMG-Verdict" not in message.raw
    wait_for(lambda: not relay.queued(), 10, what="an empty queue")


def test_connections_are_reused_and_recipients_share_a_transaction(relay, far) -> None:
    before = far.log_text().count(f"connect from unknown[{SOURCE}]")
    for i in range(6):
        send(relay, [f"r{i}a@far.{ZONE}", f"r{i}b@far.{ZONE}"], "reuse", f"reuse-{i}")
    messages = wait_for(
        lambda: len(m := with_mid_prefix(far.received(), "reuse-")) >= 6 and m,
        20,
        what="6 messages",
    )
    assert all(len(m.rcpt_tos) == 2 for m in messages)
    # One session carries them all (the one the previous test opened, or one new one).
    connects = far.log_text().count(f"connect from unknown[{SOURCE}]") - before
    assert connects <= 1, far.log_tail()


def with_mid_prefix(messages: list[ReceivedMessage], prefix: str) -> list[ReceivedMessage]:
    return [m for m in messages if f"<{prefix}" in m.raw.decode(errors="replace")]


def test_next_mx_when_the_first_does_not_answer(relay, far) -> None:
    send(relay, f"carol@multi.{ZONE}", "failover", "failover-1")
    got = wait_for(lambda: with_mid(far.received(), "failover-1"), 20, what="failover")
    assert got[0].rcpt_tos == (f"carol@multi.{ZONE}",)


def test_4xx_is_deferred_and_retried_until_delivered(relay, grey) -> None:
    rcpt = f"grey@grey.{ZONE}"
    defer_recipient(grey, rcpt)
    queue_id = send(relay, rcpt, "greylisted", "grey-1")
    queued = wait_for(
        lambda: [m for m in relay.queued() if m.id == queue_id and m.attempts >= 1],
        15,
        what="a first, deferred attempt",
    )
    assert queued[0].state in ("deferred", "active")
    assert "450 4.7.1" in (queued[0].recipients[0].last_reply or "")
    assert not with_mid(grey.received(), "grey-1")
    defer_recipient(grey, None)
    got = wait_for(lambda: with_mid(grey.received(), "grey-1"), 20, what="the retry")
    assert got[0].rcpt_tos == (rcpt,)
    wait_for(lambda: all(m.id != queue_id for m in relay.queued()), 10, what="dequeued")
    assert "status=deferred" in relay.log_path.read_text()


def test_5xx_gives_an_rfc3464_ndr_to_the_sender(relay, far, customer) -> None:
    send(relay, [f"reject@far.{ZONE}", f"fine@far.{ZONE}"], "will bounce", "bounce-1")
    ndrs = wait_for(
        lambda: [m for m in customer.received() if "bounce-1@dlv.test" in m.raw.decode()
                 and m.mail_from == ""], 20, what="the NDR",
    )  # fmt: skip
    assert len(ndrs) == 1
    ndr = ndrs[0]
    assert ndr.rcpt_tos == (SENDER,)
    report = ndr.message
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert str(report["From"]) == f"Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>"
    human, status, headers = list(report.iter_parts())
    assert "reject@far.dlv.test" in human.get_content()
    per_message, *blocks = status.get_payload()
    assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert per_message["Arrival-Date"]
    assert [b["Final-Recipient"] for b in blocks] == [f"rfc822; reject@far.{ZONE}"]
    block = blocks[0]
    assert block["Action"] == "failed" and block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == f"dns; mx.far.{ZONE}"
    assert "550 5.1.1" in block["Diagnostic-Code"] and "no such user here" in block[
        "Diagnostic-Code"]  # fmt: skip
    quoted = headers.get_content()
    assert "Subject: will bounce" in quoted and "Hello from the delivery test" not in quoted
    # The other recipient was delivered in the same attempt.
    assert with_mid(far.received(), "bounce-1")[0].rcpt_tos == (f"fine@far.{ZONE}",)


def test_null_mx_bounces_at_once(relay, customer) -> None:
    send(relay, f"dave@nullmx.{ZONE}", "null mx", "nullmx-1")
    ndr = wait_for(
        lambda: [m for m in customer.received() if "nullmx-1@dlv.test" in m.raw.decode()],
        20,
        what="the null MX NDR",
    )[0]
    blocks = list(ndr.message.iter_parts())[1].get_payload()[1:]
    assert blocks[0]["Status"] == "5.1.10"
    assert "null MX" in blocks[0]["Diagnostic-Code"]


def test_expired_message_gets_an_ndr(zone, port, customer, far, tmp_path) -> None:
    relay = make_relay(tmp_path, zone, port, max_lifetime="4s")
    try:
        queue_id = send(relay, f"later@far.{ZONE}", "never accepted", "expire-1")
        ndr = wait_for(
            lambda: [m for m in customer.received() if "expire-1@dlv.test" in m.raw.decode()],
            30,
            what="the expiry NDR",
        )[0]
        block = list(ndr.message.iter_parts())[1].get_payload()[1]
        assert block["Action"] == "failed"
        assert block["Status"].startswith("4.")
        assert "expired" in block["Diagnostic-Code"] and "450 4.2.0" in block["Diagnostic-Code"]
        wait_for(lambda: all(m.id != queue_id for m in relay.queued()), 10, what="dequeued")
    finally:
        relay.stop()
