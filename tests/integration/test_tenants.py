"""Customers as tenants against the real ``smg serve``: identity by network (longest prefix)
and by AUTH after STARTTLS, 554 without a tenant, the tenant in the queue and on every log
line, sender binding (550 naming domain and customer)."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.passwords import hash_password
from tests.conftest import require_binaries
from tests.harness import KnotDNS, TestCA
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.integration

ZONE = "tenants.test"
ZONE_TEXT = """
a       MX 10 mail.a
b       MX 10 mail.b
c       MX 10 mail.c
mail.a  A 127.0.0.40
mail.b  A 127.0.0.41
mail.c  A 127.0.0.42
far     MX 10 mx.far
mx.far  A 127.0.0.43
"""
A, B, C = (f"{x}.{ZONE}" for x in "abc")
RCPT = f"bob@far.{ZONE}"
PASSWORD = "c-secret"


def tenants_config(tmp: Path, nameserver: str, leaf: Any) -> dict[str, Any]:
    config: dict[str, Any] = base_config(
        tmp,
        nameserver,
        tls_cert=str(leaf.cert_path),
        tls_key=str(leaf.key_path),
        auth_networks=["127.0.0.6/32"],
    )
    config["tenants"] = [
        {"name": "customer-a", "networks": ["127.0.0.0/30"], "domains": [A, f".{A}"]},
        {"name": "customer-b", "networks": ["127.0.0.5/32"], "domains": [B]},
        {
            "name": "customer-c",
            "domains": [C],
            "auth": [{"user": f"relay@{C}", "password_hash": hash_password(PASSWORD, log2_n=10)}],
            "limits": {"max_sessions": 2},
        },
    ]
    return config


@pytest.fixture(scope="module")
def relay(knot_dns: KnotDNS, test_ca: TestCA, tmp_path_factory) -> Iterator[SmgRelay]:
    require_binaries("knotd")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    tmp = tmp_path_factory.mktemp("tenants")
    relay = SmgRelay(
        tmp, tenants_config(tmp, knot_dns.nameserver, test_ca.valid("gw.smg-test.example"))
    )
    relay.start()
    yield relay
    relay.stop()


def client(relay: SmgRelay, source: str) -> smtplib.SMTP:
    host, port = relay.host_port
    return smtplib.SMTP(host, port, source_address=(source, 0), timeout=15)


def message(sender: str, subject: str, from_header: str | None = None) -> bytes:
    return (
        f"From: {from_header or sender}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@test>\r\n\r\nHello.\r\n"
    ).encode()


def send(smtp: smtplib.SMTP, sender: str, subject: str, from_header: str | None = None) -> str:
    """The final reply to one transaction (or the refusal that ended it)."""
    try:
        smtp.sendmail(sender, [RCPT], message(sender, subject, from_header))
    except smtplib.SMTPSenderRefused as exc:
        return f"{exc.smtp_code} {exc.smtp_error.decode()}"
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return f"{code} {text.decode()}"
    except smtplib.SMTPDataError as exc:
        return f"{exc.smtp_code} {exc.smtp_error.decode()}"
    return "250"


def queued_tenant(relay: SmgRelay, subject: str) -> str | None:
    from gateway.queue.admin import SpoolAdmin

    with SpoolAdmin(relay.config["gateway"]["spool"]) as admin:
        for listed in admin.list():
            if f"Subject: {subject}\r\n".encode() in admin.show(listed.id).data:
                return listed.tenant or "<none>"
    return None


def test_a_tenant_by_network_gets_its_name_in_queue_and_log(relay: SmgRelay) -> None:
    with client(relay, "127.0.0.1") as smtp:
        assert send(smtp, f"alice@{A}", "by-network-a") == "250"
    assert queued_tenant(relay, "by-network-a") == "customer-a"
    with client(relay, "127.0.0.5") as smtp:
        assert send(smtp, f"bob@{B}", "by-network-b") == "250"
    assert queued_tenant(relay, "by-network-b") == "customer-b"
    log = relay.log()
    assert "connect client=127.0.0.5 tenant=customer-b" in log
    received = [line for line in log.splitlines() if " received " in line or "received:" in line]
    assert any("tenant=customer-b" in line for line in received), log


def test_a_client_without_tenant_gets_554(relay: SmgRelay) -> None:
    with pytest.raises(smtplib.SMTPConnectError) as info:
        client(relay, "127.0.0.7")
    assert info.value.smtp_code == 554
    assert b"5.7.1" in info.value.smtp_error


def test_auth_only_after_starttls_then_the_users_tenant(relay: SmgRelay) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with client(relay, "127.0.0.6") as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")  # not before STARTTLS
        code, text = smtp.docmd("MAIL FROM:<relay@c.tenants.test>")
        assert code == 530, text
        smtp.starttls(context=context)
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features.get("auth", "")
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            smtp.login(f"relay@{C}", "wrong")
        assert bad.value.smtp_code == 535
        smtp.login(f"relay@{C}", PASSWORD)
        assert send(smtp, f"relay@{C}", "by-auth-c") == "250"
    assert queued_tenant(relay, "by-auth-c") == "customer-c"
    assert f"auth client=127.0.0.6 user=relay@{C} tenant=customer-c" in relay.log()


def test_sender_binding_envelope_and_from_header(relay: SmgRelay) -> None:
    with client(relay, "127.0.0.1") as smtp:
        reply = send(smtp, f"ceo@{B}", "a-as-b-envelope")
        assert reply == f"550 5.7.1 Sender domain {B} is not registered for customer customer-a"
        smtp.rset()
        reply = send(smtp, f"alice@{A}", "a-as-b-header", from_header=f"CEO <ceo@{B}>")
        assert reply == f"550 5.7.1 Sender domain {B} is not registered for customer customer-a"
        smtp.rset()
        code, text = smtp.docmd("MAIL FROM:<nodomain>")
        assert code == 553 and b"5.1.7" in text, text
        smtp.rset()
        code, _ = smtp.docmd("MAIL FROM:<>")  # the customer's own NDRs
        assert code == 250
    assert queued_tenant(relay, "a-as-b-envelope") is None
    assert queued_tenant(relay, "a-as-b-header") is None
    assert "reason=from_binding" in relay.log() and "reason=sender_binding" in relay.log()


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def test_auth_sessions_count_against_the_customers_limit(relay: SmgRelay) -> None:
    """customer-c (AUTH only, max_sessions 2): a third logged-in session is refused with 421
    at AUTH; once one ends, a new login works."""
    import time

    def logged_in() -> smtplib.SMTP:
        smtp = client(relay, "127.0.0.6")
        smtp.starttls(context=_tls())
        smtp.login(f"relay@{C}", PASSWORD)
        return smtp

    def logged_in_soon() -> smtplib.SMTP:
        """A session that just ended may take a moment to be released."""
        deadline = time.monotonic() + 5
        while True:
            try:
                return logged_in()
            except smtplib.SMTPException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    first = logged_in_soon()  # an earlier test's session may still be closing
    second = logged_in()
    try:
        third = client(relay, "127.0.0.6")
        third.starttls(context=_tls())
        with pytest.raises((smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected)):
            third.login(f"relay@{C}", PASSWORD)
        third.close()
        assert "Too many sessions of customer customer-c" in relay.log()
        first.quit()
        again = logged_in_soon()
        assert send(again, f"relay@{C}", "auth-after-a-session-ended") == "250"
        again.quit()
    finally:
        second.close()
