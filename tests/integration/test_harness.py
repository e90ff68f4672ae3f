"""The harness daemons are real and behave as the relay's tests expect."""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess
import time
from collections.abc import Callable
from email.message import EmailMessage

import pytest

from tests.harness import (
    EICAR,
    EICAR_SIGNATURE_PREFIX,
    GTUBE,
    Clamd,
    KnotDNS,
    PostfixFarEnd,
    Rspamd,
    SmtpSink,
    StartTLSStripProxy,
    TestCA,
    swaks,
)

pytestmark = pytest.mark.integration


def eicar_mime() -> bytes:
    """A mail with EICAR as a base64 attachment."""
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.net"
    msg["Subject"] = "invoice"
    msg.set_content("see attachment\n")
    msg.add_attachment(
        EICAR, maintype="application", subtype="octet-stream", filename="invoice.com"
    )
    raw = msg.as_bytes()
    assert base64.b64encode(EICAR) in raw.replace(b"\n", b"")
    return raw


# -- TestCA ---------------------------------------------------------------------------------
def openssl_verify(ca: TestCA, cert_path: str, host: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.ca_bundle), "-verify_hostname", host, cert_path],
        capture_output=True,
        text=True,
        check=False,
    )


def test_ca_issues_valid_wrong_name_and_expired_leaves(test_ca: TestCA) -> None:
    host = "mx.example.net"
    assert openssl_verify(test_ca, str(test_ca.valid(host).cert_path), host).returncode == 0
    wrong = openssl_verify(test_ca, str(test_ca.wrong_name(host).cert_path), host)
    assert wrong.returncode != 0 and "hostname mismatch" in wrong.stdout + wrong.stderr
    expired = openssl_verify(test_ca, str(test_ca.expired(host).cert_path), host)
    assert expired.returncode != 0 and "expired" in expired.stdout + expired.stderr
    assert isinstance(test_ca.client_context(), ssl.SSLContext)


# -- clamd ----------------------------------------------------------------------------------
def test_clamd_ping_pong(clamd: Clamd) -> None:
    assert clamd.command(b"PING") == b"PONG"


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_clamd_finds_eicar_plain_and_in_mime(clamd: Clamd, tcp: bool) -> None:
    assert clamd.instream(b"just a harmless business letter\n", tcp=tcp) == "stream: OK"
    for payload in (EICAR, eicar_mime()):
        reply = clamd.instream(payload, tcp=tcp)
        assert reply.startswith(f"stream: {EICAR_SIGNATURE_PREFIX}"), reply
        assert reply.endswith("FOUND")


def test_clamd_stream_limit_and_restart_on_same_addresses(clamd_private: Clamd) -> None:
    clamd_private.stop()
    assert not clamd_private.ping()
    clamd_private.stream_max_length = "1K"
    tcp_before = clamd_private.tcp
    clamd_private.start()
    assert clamd_private.tcp == tcp_before
    assert "size limit exceeded" in clamd_private.instream(b"x" * 4096)


# -- knot DNS -------------------------------------------------------------------------------
def kdig(knot: KnotDNS, *args: str) -> str:
    assert knot.port is not None
    cmd = ["kdig", f"@{knot.address}", "-p", str(knot.port), "+time=2", "+retry=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10).stdout


HARNESS_ZONE = """\
@     MX  10 mx.harness-zone.test.
mx    A   127.0.0.10
@     TXT "v=spf1 -all"
"""


def test_knot_answers_a_mx_txt_over_udp_and_tcp(knot_dns: KnotDNS) -> None:
    knot_dns.set_zone("harness-zone.test", HARNESS_ZONE)
    assert kdig(knot_dns, "harness-zone.test", "MX", "+short").strip() == "10 mx.harness-zone.test."
    assert kdig(knot_dns, "mx.harness-zone.test", "A", "+short", "+tcp").strip() == "127.0.0.10"
    assert kdig(knot_dns, "harness-zone.test", "TXT", "+short").strip() == '"v=spf1 -all"'
    assert "status: NXDOMAIN" in kdig(knot_dns, "nothing-here.invalid", "A")


def test_knot_set_zone_replaces_and_servfail_zone_breaks(knot_dns: KnotDNS) -> None:
    knot_dns.set_zone("harness-flip.test", "@ A 127.0.0.11\n")
    knot_dns.set_zone("harness-flip.test", "@ A 127.0.0.12\n")
    assert kdig(knot_dns, "harness-flip.test", "A", "+short").strip() == "127.0.0.12"
    knot_dns.servfail_zone("harness-flip.test")
    assert "status: SERVFAIL" in kdig(knot_dns, "harness-flip.test", "A")
    knot_dns.set_zone("harness-flip.test", "@ A 127.0.0.13\n")  # and back to healthy
    assert kdig(knot_dns, "harness-flip.test", "A", "+short").strip() == "127.0.0.13"


def test_dead_nameserver_never_answers(knot_dns: KnotDNS) -> None:
    dead = knot_dns.dead_nameserver()
    host, port = dead.nameserver.split(":")
    started = time.monotonic()
    out = subprocess.run(
        ["kdig", f"@{host}", "-p", port, "+time=1", "+retry=0", "example.com", "A"],
        capture_output=True, text=True, check=False, timeout=10,
    )  # fmt: skip
    assert "response timeout" in out.stdout + out.stderr
    assert time.monotonic() - started >= 0.9


# -- rspamd ---------------------------------------------------------------------------------
HAM = b"""\
From: Alice Example <alice@example.com>
To: Bob <bob@example.net>
Subject: Meeting on Thursday
Date: Fri, 27 Nov 2026 10:00:00 +0000
Message-ID: <abc123@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Hi Bob,

can we move our meeting on Thursday to 3 pm? The quarterly figures are attached to the
calendar invite.

Best regards,
Alice
"""


def test_rspamd_rejects_gtube_and_passes_ham(rspamd: Rspamd) -> None:
    spam = HAM.replace(b"Hi Bob,", GTUBE)
    verdict = rspamd.check(spam)
    assert verdict["action"] == "reject", verdict
    assert "GTUBE" in verdict["symbols"]
    verdict = rspamd.check(HAM)
    assert verdict["action"] == "no action", verdict


# -- Postfix far end ------------------------------------------------------------------------
FarEndFactory = Callable[..., PostfixFarEnd]


@pytest.mark.parametrize("mode", ["valid", "none"])
def test_postfix_far_end_receives_and_reports_client_and_tls(
    postfix_far_end: FarEndFactory, mode: str
) -> None:
    far_end = postfix_far_end("127.0.0.21", tls=mode, hostname="mx.harness.test")
    result = swaks(
        far_end.endpoint,
        to=["bob@example.net", "carol@example.org"],
        tls="optional",
        local_address="127.0.0.22",
        timeout=20,
    )
    assert result.ok, result.transcript
    [message] = far_end.wait_for_messages(1)
    assert message.client_address == "127.0.0.22"
    assert message.mail_from == "alice@example.com"
    assert sorted(message.rcpt_tos) == ["bob@example.net", "carol@example.org"]
    assert message.helo == "client.example.com"
    assert message.tls is (mode == "valid")
    assert (message.tls_protocol or "").startswith("TLSv1.") is (mode == "valid")
    assert "STARTTLS" in result.transcript
    assert far_end.queue_id_in_log(message.queue_id)


def test_postfix_certificates_verify_as_designed(
    postfix_far_end: FarEndFactory, test_ca: TestCA
) -> None:
    """valid verifies against the CA for its name; wrong-name and expired do not."""
    outcomes = {}
    for mode in ("valid", "wrong-name", "expired"):
        far_end = postfix_far_end("127.0.0.23", tls=mode, hostname="mx.verify.test")
        outcomes[mode] = starttls_verifies(far_end, test_ca, "mx.verify.test")
    assert outcomes == {"valid": "ok", "wrong-name": "hostname", "expired": "expired"}


def starttls_verifies(far_end: PostfixFarEnd, ca: TestCA, hostname: str) -> str:
    """STARTTLS verifying the certificate against `ca` for `hostname`: "ok" or what failed."""
    assert far_end.port is not None
    with smtplib.SMTP(far_end.address, far_end.port, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.docmd("STARTTLS")[0] == 220
        assert client.sock is not None
        try:
            tls = ca.client_context().wrap_socket(client.sock, server_hostname=hostname)
        except ssl.SSLCertVerificationError as exc:
            return "expired" if "expired" in exc.verify_message else "hostname"
        tls.close()
        return "ok"


def test_postfix_far_end_rejects_configured_recipients_and_restarts(
    postfix_far_end: FarEndFactory,
) -> None:
    far_end = postfix_far_end(
        "127.0.0.24", tls="none", reject_recipients={"gone@example.net": "550 5.1.1 gone"}
    )
    refused = swaks(far_end.endpoint, to="gone@example.net", timeout=20)
    assert not refused.ok and "550 5.1.1" in refused.transcript
    endpoint = far_end.endpoint
    far_end.stop()
    assert not swaks(endpoint, timeout=5).ok
    far_end.start()
    assert far_end.endpoint == endpoint
    assert swaks(endpoint, timeout=20).ok
    assert len(far_end.wait_for_messages(1)) == 1


# -- STARTTLS strip proxy and sink ----------------------------------------------------------
def test_strip_proxy_hides_starttls(
    postfix_far_end: FarEndFactory,
    starttls_strip_proxy: Callable[..., StartTLSStripProxy],
) -> None:
    far_end = postfix_far_end("127.0.0.25", tls="valid")
    proxy = starttls_strip_proxy("127.0.0.26:0", far_end.endpoint)
    direct = swaks(far_end.endpoint, extra_args=["--quit-after", "EHLO"], timeout=20)
    assert "250-STARTTLS" in direct.transcript
    assert not swaks(proxy.endpoint, tls=True, timeout=20).ok  # STARTTLS required: fails
    via_proxy = swaks(proxy.endpoint, tls="optional", timeout=20)
    assert via_proxy.ok and "STARTTLS" not in via_proxy.transcript.split("*** Host")[0]
    [message] = far_end.wait_for_messages(1)
    assert message.tls is False
    # A client that sends STARTTLS anyway gets 502 from the proxy.
    with smtplib.SMTP(proxy.listen_host, proxy.listen_port, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.docmd("STARTTLS")[0] == 502
    assert proxy.refused == 1


def test_smtp_sink_records_tls_peer_and_rejections(
    smtp_sink: Callable[..., SmtpSink], test_ca: TestCA
) -> None:
    sink = smtp_sink(
        "127.0.0.27",
        tls_cert=test_ca.valid("sink.harness.test"),
        reject_recipients={"no@example.net": "550 5.1.1 no such user"},
    )
    result = swaks(
        sink.endpoint, to=["yes@example.net", "no@example.net"], tls=True,
        local_address="127.0.0.28", timeout=20,
    )  # fmt: skip
    assert result.ok and "550 5.1.1 no such user" in result.transcript
    [message] = sink.wait_for_messages(1)
    assert message.peer[0] == "127.0.0.28" and message.tls
    assert message.rcpt_tos == ("yes@example.net",)
    assert message.mail_from == "alice@example.com"
    assert b"This is a test mailing" in message.data
