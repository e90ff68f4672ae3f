"""The harness daemons are real and behave as the relay's tests expect."""

from __future__ import annotations

import base64
import ssl
import subprocess
import time
from email.message import EmailMessage

import pytest

from tests.harness import EICAR, EICAR_SIGNATURE_PREFIX, GTUBE, Clamd, KnotDNS, Rspamd, TestCA

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
