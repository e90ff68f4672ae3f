"""Spam over two real bad gateways (issue 13, point 2): a good gateway (real rspamd) spreads
GTUBE over both by queue id; with one stopped, everything leaves through the other; with both
stopped, the spam waits in the good gateway's queue and nothing reaches the far end; one
restarted, the queue drains through it.

Addresses: the good gateway sends from 127.0.43.5; bad gateway A listens on 127.0.43.20 and
sends from 127.0.43.21, B listens on 127.0.43.22 and sends from 127.0.43.23; the far end's MX
is 127.0.43.11.
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

ZONE = "smgbg2.test"
ZONE_TEXT = """
customer     MX 10 mx.far
far          MX 10 mx.far
mx.far       A 127.0.43.11
bad-a        A 127.0.43.20
bad-b        A 127.0.43.22
"""
SENDER = f"alice@customer.{ZONE}"
GOOD_SOURCE = "127.0.43.5"
BAD = {"a": ("127.0.43.20", "127.0.43.21"), "b": ("127.0.43.22", "127.0.43.23")}
SOURCE_OF = {source: name for name, (_, source) in BAD.items()}


def spam(mid: str, to: str) -> str:
    return (
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: special offer {mid}\r\n"
        f"Message-ID: <{mid}@{ZONE}>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
        f"Buy now.\r\n{GTUBE.decode()}\r\n"
    )


@pytest.fixture(scope="module")
def far_end() -> Iterator[PostfixFarEnd]:
    require_binaries("postfix", "swaks")
    port = common_port("127.0.43.11")
    far = PostfixFarEnd("127.0.43.11", port, f"mx.far.{ZONE}", tls="none")
    far.start()
    yield far
    far.close()


def _bad_gateway(name: str, knot: KnotDNS, ca: TestCA, port: int, tmp) -> SmgRelay:
    listen, source = BAD[name]
    leaf = ca.valid(f"bad-{name}.{ZONE}")
    config = base_config(tmp, knot.nameserver, role="bad", hostname=f"bad-{name}.{ZONE}",
                         source_address=source, tls_cert=str(leaf.cert_path),
                         tls_key=str(leaf.key_path), client_networks=["127.0.0.0/8"],
                         listen=[f"{listen}:{free_port(listen)}"])  # fmt: skip
    config["delivery"] = {"port": port, "retry_initial": "1s", "retry_max": "2s",
                          "scan_interval": "200ms"}  # fmt: skip
    config["routing"] = {"good_gateways": [GOOD_SOURCE]}
    return SmgRelay(tmp, config)


@pytest.fixture(scope="module")
def fleet(
    knot_dns: KnotDNS, rspamd: Rspamd, test_ca: TestCA, far_end, tmp_path_factory
) -> Iterator[tuple[SmgRelay, dict[str, SmgRelay]]]:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    port = far_end.port
    bad = {n: _bad_gateway(n, knot_dns, test_ca, port, tmp_path_factory.mktemp(f"bad-{n}"))
           for n in BAD}  # fmt: skip
    good_tmp = tmp_path_factory.mktemp("good-gateway")
    good_config = base_config(good_tmp, knot_dns.nameserver, hostname=f"good.{ZONE}",
                              source_address=GOOD_SOURCE)  # fmt: skip
    good_config["delivery"] = {"port": port, "retry_initial": "1s", "retry_max": "2s",
                               "scan_interval": "200ms"}  # fmt: skip
    good_config["spam"] = {"enabled": True, "rspamd_url": rspamd.url, "timeout": "10s"}
    good_config["routing"] = {
        "bad_gateways": [f"bad-{n}.{ZONE}:{r.host_port[1]}" for n, r in bad.items()],
        "internal_ca": str(test_ca.ca_bundle),
    }
    good = SmgRelay(good_tmp, good_config)
    for relay in bad.values():
        relay.start()
    good.start()
    yield good, bad
    good.stop()
    for relay in bad.values():
        relay.stop()


def send(relay: SmgRelay, mid: str) -> None:
    to = f"bob@far.{ZONE}"
    result = swaks(relay.endpoint, to=to, mail_from=SENDER, data=spam(mid, to))
    assert result.ok, result.transcript


def arrived(far: PostfixFarEnd, prefix: str) -> dict[str, str]:
    """Message-id tag -> the bad gateway it came through ("a" or "b")."""
    out = {}
    for m in far.received():
        mid = m.message.get("Message-ID", "")
        if f"<{prefix}" in mid:
            out[mid.strip("<>").split("@")[0]] = SOURCE_OF.get(m.client_address, m.client_address)
    return out


def test_spam_is_spread_over_both_bad_gateways(fleet, far_end) -> None:
    good, _ = fleet
    for i in range(12):
        send(good, f"spread-{i}")
    got = wait_for(lambda: (a := arrived(far_end, "spread-")) and len(a) == 12 and a, 60,
                   what="12 spam messages at the far end")  # fmt: skip
    assert set(got.values()) == {"a", "b"}, got  # 2 ** -11 to fail by chance


def test_one_bad_gateway_down_spam_leaves_through_the_other(fleet, far_end) -> None:
    good, bad = fleet
    bad["a"].stop()
    try:
        for i in range(6):
            send(good, f"oneup-{i}")
        got = wait_for(lambda: (a := arrived(far_end, "oneup-")) and len(a) == 6 and a, 60,
                       what="6 spam messages through bad gateway b")  # fmt: skip
        assert set(got.values()) == {"b"}, got
        assert "bad_gateway_down" in good.log_path.read_text()
    finally:
        bad["a"].start()


def test_both_down_spam_waits_nothing_leaks_then_drains(fleet, far_end) -> None:
    good, bad = fleet
    bad["a"].stop()
    bad["b"].stop()
    try:
        send(good, "bothdown-1")
        queued = wait_for(
            lambda: [m for m in good.queued() if m.route == "bad_gateway" and m.attempts >= 2],
            30, what="two failed attempts",
        )  # fmt: skip
        assert queued[0].state in ("deferred", "active")
        time.sleep(1)
        assert not arrived(far_end, "bothdown-")  # never direct
    finally:
        bad["b"].start()
    got = wait_for(lambda: arrived(far_end, "bothdown-"), 30, what="drained through b")
    assert got == {"bothdown-1": "b"}
    bad["a"].start()
