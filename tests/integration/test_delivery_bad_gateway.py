"""Spam through two real relays: a good gateway (real rspamd) reroutes GTUBE to a bad gateway
over STARTTLS verified against the fleet's CA; the bad gateway delivers it from its own address
without the verdict header, and when the far end refuses it, its NDR tells the customer the
message was classified as spam (score, rules).  With the bad gateway down, the spam stays queued
on the good gateway and never goes out directly.

Addresses: good gateway sends from 127.0.26.5, bad gateway listens on 127.0.26.20 and sends from
127.0.26.21; Postfix far ends: the customer's MX 127.0.26.10, the recipient's MX 127.0.26.11.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, TestCA, common_port, free_port, wait_for
from tests.harness.postfix import PostfixFarEnd
from tests.harness.rspamd import GTUBE, Rspamd
from tests.harness.swaks import swaks
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.integration

ZONE = "smgbg.test"
ZONE_TEXT = """
customer     MX 10 mx.customer
mx.customer  A 127.0.26.10
far          MX 10 mx.far
mx.far       A 127.0.26.11
bad          A 127.0.26.20
"""
SENDER = f"alice@customer.{ZONE}"
GOOD_SOURCE, BAD_LISTEN, BAD_SOURCE = "127.0.26.5", "127.0.26.20", "127.0.26.21"


def spam(mid: str, to: str) -> str:
    return (
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: special offer {mid}\r\n"
        f"Message-ID: <{mid}@{ZONE}>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
        f"Buy now.\r\n{GTUBE.decode()}\r\n"
    )


@pytest.fixture(scope="module")
def far_ends() -> Iterator[tuple[int, PostfixFarEnd, PostfixFarEnd]]:
    require_binaries("postfix", "swaks")
    port = common_port("127.0.26.10", "127.0.26.11")
    customer = PostfixFarEnd("127.0.26.10", port, f"mx.customer.{ZONE}", tls="none")
    far = PostfixFarEnd(
        "127.0.26.11", port, f"mx.far.{ZONE}", tls="none",
        reject_recipients={f"spamtrap@far.{ZONE}": "550 5.7.1 spam trap, go away"},
    )  # fmt: skip
    customer.start()
    far.start()
    yield port, customer, far
    far.close()
    customer.close()


@pytest.fixture(scope="module")
def gateways(
    knot_dns: KnotDNS, rspamd: Rspamd, test_ca: TestCA, far_ends, tmp_path_factory
) -> Iterator[tuple[SmgRelay, SmgRelay]]:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    port, _, _ = far_ends
    bad_port = free_port(BAD_LISTEN)
    leaf = test_ca.valid(f"bad.{ZONE}")
    delivery = {"port": port, "retry_initial": "1s", "retry_max": "2s", "scan_interval": "200ms"}

    bad_tmp = tmp_path_factory.mktemp("bad-gateway")
    bad_config = base_config(bad_tmp, knot_dns.nameserver, role="bad", hostname=f"bad.{ZONE}",
                             source_address=BAD_SOURCE, tls_cert=str(leaf.cert_path),
                             tls_key=str(leaf.key_path), client_networks=["127.0.0.0/8"],
                             listen=[f"{BAD_LISTEN}:{bad_port}"])  # fmt: skip
    bad_config["delivery"] = delivery
    bad_config["routing"] = {"good_gateways": [GOOD_SOURCE]}
    bad = SmgRelay(bad_tmp, bad_config)

    good_tmp = tmp_path_factory.mktemp("good-gateway")
    good_config = base_config(good_tmp, knot_dns.nameserver, hostname=f"good.{ZONE}",
                              source_address=GOOD_SOURCE)  # fmt: skip
    good_config["delivery"] = delivery
    good_config["spam"] = {"enabled": True, "rspamd_url": rspamd.url, "timeout": "10s"}
    good_config["routing"] = {
        "bad_gateways": [f"bad.{ZONE}:{bad_port}"],
        "internal_ca": str(test_ca.ca_bundle),
    }
    good = SmgRelay(good_tmp, good_config)
    bad.start()
    good.start()
    yield good, bad
    good.stop()
    bad.stop()


def send(relay: SmgRelay, to: str, mid: str) -> None:
    result = swaks(relay.endpoint, to=to, mail_from=SENDER, data=spam(mid, to))
    assert result.ok, result.transcript


def test_spam_goes_via_the_bad_gateway_over_verified_tls(gateways, far_ends) -> None:
    good, bad = gateways
    _, _, far = far_ends
    send(good, f"bob@far.{ZONE}", "spam-1")
    got = wait_for(
        lambda: [m for m in far.received() if b"spam-1@" in m.raw], 30, what="spam at far end"
    )[0]
    assert got.client_address == BAD_SOURCE  # from the bad gateway, not from the good one
    assert b"X-SMG-Verdict" not in got.raw  # the internal verdict never leaves the fleet
    good_log, bad_log = good.log_path.read_text(), bad.log_path.read_text()
    hop = next(line for line in good_log.splitlines() if "route=bad_gateway" in line)
    assert f"relay=bad.{ZONE}[{BAD_LISTEN}]" in hop and "verify=verified" in hop, hop
    assert "status=sent" in hop
    assert any(
        " received " in line and f"client={GOOD_SOURCE}" in line and "tls=True" in line
        for line in bad_log.splitlines()
    ), bad_log[-2000:]


def test_ndr_from_the_bad_gateway_says_it_was_spam(gateways, far_ends) -> None:
    good, _ = gateways
    _, customer, _ = far_ends
    send(good, f"spamtrap@far.{ZONE}", "spam-2")
    ndr = wait_for(
        lambda: [m for m in customer.received() if b"spam-2@" in m.raw and m.mail_from == ""],
        30,
        what="the NDR",
    )[0]
    assert ndr.client_address == BAD_SOURCE
    text = next(ndr.message.iter_parts()).get_content()
    assert "classified as spam" in text and "GTUBE" in text, text
    assert "spam trap, go away" in " ".join(text.split())
    block = list(ndr.message.iter_parts())[1].get_payload()[1]
    assert block["Status"] == "5.7.1" and block["Remote-MTA"] == f"dns; mx.far.{ZONE}"


def test_bad_gateway_down_spam_waits_and_never_goes_direct(gateways, far_ends) -> None:
    good, bad = gateways
    _, _, far = far_ends
    bad.stop()
    try:
        send(good, f"carol@far.{ZONE}", "spam-3")
        queued = wait_for(
            lambda: [m for m in good.queued() if m.route == "bad_gateway" and m.attempts >= 2],
            30,
            what="two failed attempts",
        )
        assert queued[0].state in ("deferred", "active")
        time.sleep(1)
        assert not [m for m in far.received() if b"spam-3@" in m.raw]
    finally:
        bad.start()
    got = wait_for(lambda: [m for m in far.received() if b"spam-3@" in m.raw], 30,
                   what="delivery once the bad gateway is back")  # fmt: skip
    assert got[0].client_address == BAD_SOURCE
