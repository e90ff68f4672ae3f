"""The harness daemons are real and behave as the relay's tests expect."""

from __future__ import annotations

import base64
import ssl
import subprocess
from email.message import EmailMessage

import pytest

from tests.harness import EICAR, EICAR_SIGNATURE_PREFIX, Clamd, TestCA

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
