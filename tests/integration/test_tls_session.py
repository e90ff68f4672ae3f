"""In-session rejection for forced-TLS ``reject`` rules (issue 14): the real ``smg serve``
probes real Postfix far ends (knot DNS serves the MX) while the client waits at RCPT.

- 127.0.28.11 ``mx.valid.sess.test``: STARTTLS with a valid certificate;
- 127.0.28.12 ``mx.notls.sess.test``: no STARTTLS;
- 127.0.28.13 ``mx.slow.sess.test``: accepts TCP connections and never greets (a listening
  socket nobody reads): the probe times out.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, TestCA, wait_for
from tests.harness.postfix import PostfixFarEnd
from tests.harness.swaks import swaks
from tests.integration.smg_relay import base_config, server_said
from tests.integration.tls_support import (
    TlsRelay,
    common_port,
    mail_from_logged,
    send,
    started_far_ends,
    with_mid,
)

pytestmark = pytest.mark.integration

ZONE = "sess.test"
SOURCE = "127.0.28.5"
BANK = f"alice@bank.{ZONE}"
FAR_ENDS = {"valid": ("127.0.28.11", "valid"), "notls": ("127.0.28.12", "none")}
SLOW = "127.0.28.13"
ZONE_TEXT = """
bank            MX 10 mx.valid
valid           MX 10 mx.valid
mx.valid        A 127.0.28.11
notls           MX 10 mx.notls
mx.notls        A 127.0.28.12
slow            MX 10 mx.slow
mx.slow         A 127.0.28.13
"""
RULES = [
    {"sender": f"bank.{ZONE}", "recipient": f".{ZONE}", "level": "verify", "on_failure": "reject"},
    {"sender": f"bank.{ZONE}", "recipient": f"notls.{ZONE}", "level": "encrypt",
     "on_failure": "reject"},
]  # fmt: skip


@pytest.fixture(scope="module")
def port() -> int:
    return common_port(*(a for a, _ in FAR_ENDS.values()), SLOW, SOURCE)


@pytest.fixture(scope="module")
def far(port: int, test_ca: TestCA) -> Iterator[dict[str, PostfixFarEnd]]:
    require_binaries("postfix", "swaks")
    with started_far_ends(FAR_ENDS, port, test_ca, lambda n: f"mx.{n}.{ZONE}") as started:
        yield started


@pytest.fixture(scope="module")
def slow(port: int) -> Iterator[socket.socket]:
    """Completes the TCP handshake (the kernel's backlog) and never says a word."""
    listener = socket.create_server((SLOW, port), backlog=64)
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def relay(knot_dns: KnotDNS, port, far, slow, test_ca, tmp_path_factory) -> Iterator[TlsRelay]:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    tmp = tmp_path_factory.mktemp("tls-session")
    config = base_config(tmp, knot_dns.nameserver, workers=2)
    config["gateway"]["source_address"] = SOURCE
    config["delivery"] = {"port": port, "retry_initial": "1h", "scan_interval": "200ms"}
    config["tls_policy"] = {"ca_bundle": str(test_ca.ca_bundle), "session_probe_timeout": "2s"}
    config["mta_sts"] = {"enabled": False}
    relay = TlsRelay(tmp, config, RULES)
    relay.start()
    yield relay
    relay.stop()


def probes(relay: TlsRelay, domain: str) -> list[str]:
    text = relay.log_path.read_text()
    return [x for x in text.splitlines() if "tls_probe" in x and f"domain={domain}" in x]


def test_no_starttls_is_refused_at_rcpt_and_nothing_is_queued(relay, far) -> None:
    result = swaks(relay.endpoint, to=f"ann@notls.{ZONE}", mail_from=BANK)
    assert not result.ok and server_said(result.transcript, "550 5.7.10"), result.transcript
    assert "STARTTLS not offered" in result.transcript
    assert not [m for m in relay.queued() if m.sender == BANK]
    assert not mail_from_logged(far["notls"], BANK), far["notls"].log_tail()
    assert f"connect from unknown[{SOURCE}]" in far["notls"].log_text()  # the probe went


def test_healthy_far_end_is_accepted_and_delivered_over_tls(relay, far) -> None:
    send(relay, BANK, f"ann@valid.{ZONE}", "sess-valid-1")
    got = wait_for(lambda: with_mid(far["valid"].received(), "sess-valid-1"), 20, what="mail")[0]
    assert got.tls
    assert any("result=ok" in x for x in probes(relay, f"valid.{ZONE}"))


def test_probe_timeout_gives_450_and_a_flood_runs_one_probe(relay) -> None:
    started = time.monotonic()
    first = swaks(relay.endpoint, to=f"ann@slow.{ZONE}", mail_from=BANK)
    took = time.monotonic() - started
    assert not first.ok and server_said(first.transcript, "450 4.7.10"), first.transcript
    assert took < 15, took  # bounded by session_probe_timeout (2 s), not by delivery's
    flood = [swaks(relay.endpoint, to=f"u{i}@slow.{ZONE}", mail_from=BANK) for i in range(10)]
    assert all(server_said(r.transcript, "450 4.7.10") for r in flood)
    assert len(probes(relay, f"slow.{ZONE}")) == 1  # the other 10 answered from the cache
