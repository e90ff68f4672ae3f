"""Forced TLS through the real ``smg serve`` to real Postfix far ends (knot DNS serves the MX).

Far ends, all on one port (like port 25 on the internet), certificates from the tests' CA:

- 127.0.24.10 ``mx.customer.tls.test``: the senders' own MX, where NDRs arrive (no TLS);
- 127.0.24.11 ``mx.valid.tls.test``: STARTTLS with a valid certificate;
- 127.0.24.12 ``mx.notls.tls.test``: no STARTTLS;
- 127.0.24.13 ``mx.wrongname.tls.test``: a valid certificate for another name;
- 127.0.24.14 ``mx.expired.tls.test``: an expired certificate;
- 127.0.24.15 ``mx.strip.tls.test``: the harness's StartTLSStripProxy (STARTTLS removed from the
  EHLO reply) in front of 127.0.24.17 (a Postfix with a valid certificate for mx.strip.tls.test);
- 127.0.24.16 ``mx.fixme.tls.test``: no STARTTLS at first, fixed (valid certificate) mid-test.

Under a rule no message from ``alice@bank.tls.test`` ever reaches a far end that cannot give
the TLS the rule asks for: neither in its mail directory nor in its log (Postfix logs
``from=<...>`` for each MAIL FROM it queued).  The relay sends from 127.0.24.5.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, TestCA, wait_for
from tests.harness.postfix import PostfixFarEnd
from tests.harness.proxy import StartTLSStripProxy
from tests.harness.swaks import swaks
from tests.integration.smg_relay import base_config, server_said
from tests.integration.tls_support import (
    TlsRelay,
    common_port,
    mail_from_logged,
    queue_entry,
    send,
    smg,
    started_far_ends,
    with_mid,
)

pytestmark = pytest.mark.integration

ZONE = "tls.test"
SOURCE = "127.0.24.5"
BANK = f"alice@bank.{ZONE}"  # the customer with forced-TLS rules
SHOP = f"bob@shop.{ZONE}"  # a customer without rules (except one, below)
FAR_ENDS = {  # name: (address, tls)
    "customer": ("127.0.24.10", "none"),
    "valid": ("127.0.24.11", "valid"),
    "notls": ("127.0.24.12", "none"),
    "wrongname": ("127.0.24.13", "wrong-name"),
    "expired": ("127.0.24.14", "expired"),
    "fixme": ("127.0.24.16", "none"),
    "stripped": ("127.0.24.17", "valid"),
}
STRIP_PROXY = "127.0.24.15"
ZONE_TEXT = """
bank            MX 10 mx.customer
shop            MX 10 mx.customer
mx.customer     A 127.0.24.10
valid           MX 10 mx.valid
mx.valid        A 127.0.24.11
notls           MX 10 mx.notls
mx.notls        A 127.0.24.12
wrongname       MX 10 mx.wrongname
mx.wrongname    A 127.0.24.13
expired         MX 10 mx.expired
mx.expired      A 127.0.24.14
strip           MX 10 mx.strip
mx.strip        A 127.0.24.15
fixme           MX 10 mx.fixme
mx.fixme        A 127.0.24.16
multi           MX 10 mx.notls
multi           MX 20 mx.valid
"""
RULES = [
    {"sender": f"bank.{ZONE}", "recipient": f"valid.{ZONE}", "level": "verify"},
    {"sender": f"bank.{ZONE}", "recipient": f"notls.{ZONE}", "level": "encrypt"},
    {
        "sender": f"bank.{ZONE}",
        "recipient": f"wrongname.{ZONE}",
        "level": "verify",
        "on_failure": "reject",
    },
    {"sender": f"bank.{ZONE}", "recipient": f"expired.{ZONE}", "level": "verify"},
    {
        "sender": f"bank.{ZONE}",
        "recipient": f"strip.{ZONE}",
        "level": "encrypt",
        "on_failure": "reject",
    },
    {"sender": f"bank.{ZONE}", "recipient": f"fixme.{ZONE}", "level": "verify"},
    {"sender": f"bank.{ZONE}", "recipient": f"multi.{ZONE}", "level": "encrypt"},
    # encrypt takes any certificate: shop's mail to the wrong-name and expired far ends goes
    {"sender": f"shop.{ZONE}", "recipient": f"wrongname.{ZONE}", "level": "encrypt"},
    {"sender": f"shop.{ZONE}", "recipient": f"expired.{ZONE}", "level": "encrypt"},
]


@pytest.fixture(scope="module")
def port() -> int:
    return common_port(*(a for a, _ in FAR_ENDS.values()), STRIP_PROXY, SOURCE)


@pytest.fixture(scope="module")
def zone(knot_dns: KnotDNS) -> KnotDNS:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    return knot_dns


def far_end_name(name: str) -> str:
    """The far end behind the StartTLS-strip proxy answers with the proxy's MX name."""
    return "mx.strip.tls.test" if name == "stripped" else f"mx.{name}.{ZONE}"


@pytest.fixture(scope="module")
def far(port: int, test_ca: TestCA) -> Iterator[dict[str, PostfixFarEnd]]:
    require_binaries("postfix", "swaks")
    with started_far_ends(FAR_ENDS, port, test_ca, far_end_name) as started:
        yield started


@pytest.fixture(scope="module")
def proxy(port: int, far: dict[str, PostfixFarEnd]) -> Iterator[StartTLSStripProxy]:
    strip = StartTLSStripProxy((STRIP_PROXY, port), (FAR_ENDS["stripped"][0], port))
    strip.start()
    yield strip
    strip.stop()


@pytest.fixture(scope="module")
def relay(zone, port, far, proxy, test_ca, tmp_path_factory) -> Iterator[TlsRelay]:
    tmp = tmp_path_factory.mktemp("forced-tls")
    config = base_config(tmp, zone.nameserver, hostname="gw.smg-test.example")
    config["gateway"]["source_address"] = SOURCE
    config["delivery"] = {
        "port": port,
        "retry_initial": "1h",  # nothing is retried by itself during the test...
        "throttle_pause": "1s",  # a failed host pauses its domain only briefly here
        "scan_interval": "200ms",
        "connect_timeout": "3s",
    }
    # ... and held mail waits for an operator's release
    # session_probe off: these tests show the delivery-time path (NDR, then the known failure);
    # the in-session probe has its own tests (test_tls_session.py)
    config["tls_policy"] = {
        "ca_bundle": str(test_ca.ca_bundle),
        "hold_retry": "1h",
        "session_probe": False,
    }
    config["mta_sts"] = {"enabled": False}
    relay = TlsRelay(tmp, config, RULES)
    relay.start()
    yield relay
    relay.stop()


def delivered(far_end: PostfixFarEnd, mid: str, timeout: float = 20.0):
    return wait_for(lambda: with_mid(far_end.received(), mid), timeout, what=mid)[0]


def ndr_for(customer: PostfixFarEnd, mid: str):
    return wait_for(
        lambda: [
            m
            for m in customer.received()
            if m.mail_from == "" and f"{mid}@tls.test" in m.raw.decode(errors="replace")
        ],
        20,
        what=f"the NDR for {mid}\n{customer.log_tail()}",
    )[0]


def ndr_status(ndr) -> tuple[str, str]:
    """(Status, the human-readable text) of a one-recipient NDR."""
    human, status, _ = list(ndr.message.iter_parts())
    _, block = status.get_payload()
    return block["Status"], human.get_content()


# --- the tests ---------------------------------------------------------------------------------


def test_verify_rule_delivers_over_verified_tls_and_logs_it(relay, far) -> None:
    send(relay, BANK, f"ann@valid.{ZONE}", "valid-1")
    got = delivered(far["valid"], "valid-1")
    assert got.tls and got.tls_protocol in ("TLSv1.2", "TLSv1.3") and got.tls_cipher
    assert "TLS connection established from" in far["valid"].log_text()
    line = wait_for(
        lambda: [
            x for x in relay.log_path.read_text().splitlines() if "delivery to=<ann@valid" in x
        ],
        10,
        what="the delivery log line",
    )[0]
    assert f"tls={got.tls_protocol}" in line and f"cipher={got.tls_cipher}" in line
    assert "verify=verified" in line and "status=sent" in line


def test_no_starttls_is_held_and_nothing_is_sent(relay, far) -> None:
    queue_id = send(relay, BANK, f"ann@notls.{ZONE}", "notls-1")
    held = queue_entry(relay, queue_id, "held")
    assert held.hold_reason == "tls"
    assert "STARTTLS not offered" in (held.recipients[0].last_reply or "")
    assert not with_mid(far["notls"].received(), "notls-1")
    assert not mail_from_logged(far["notls"], BANK), far["notls"].log_tail()
    assert f"connect from unknown[{SOURCE}]" in far["notls"].log_text()  # it did try


def test_expired_certificate_under_verify_is_held(relay, far) -> None:
    queue_id = send(relay, BANK, f"ann@expired.{ZONE}", "expired-1")
    held = queue_entry(relay, queue_id, "held")
    assert "expired" in (held.recipients[0].last_reply or "")
    assert not mail_from_logged(far["expired"], BANK), far["expired"].log_tail()


def test_wrong_name_under_verify_reject_bounces_then_rcpt_is_refused(relay, far) -> None:
    send(relay, BANK, f"ann@wrongname.{ZONE}", "wrongname-1")
    status, text = ndr_status(ndr_for(far["customer"], "wrongname-1"))
    assert status == "5.7.10"
    assert "no TLS connection could be established" in text
    assert not mail_from_logged(far["wrongname"], BANK), far["wrongname"].log_tail()
    wait_for(lambda: not [m for m in relay.queued() if m.sender == BANK and
                          b"wrongname-1" in m.data], 10, what="gone")  # fmt: skip
    # The failure is known now: the next recipient there is refused in the session itself.
    second = swaks(relay.endpoint, to=f"ann@wrongname.{ZONE}", mail_from=BANK)
    assert not second.ok and server_said(second.transcript, "550 5.7.10"), second.transcript
    # ... only under the reject rule: shop's encrypt rule takes any certificate and delivers.
    send(relay, SHOP, f"ann@wrongname.{ZONE}", "wrongname-shop")
    assert delivered(far["wrongname"], "wrongname-shop").tls


def test_encrypt_takes_an_expired_certificate(relay, far) -> None:
    send(relay, SHOP, f"ann@expired.{ZONE}", "expired-shop")
    assert delivered(far["expired"], "expired-shop").tls


def test_stripped_starttls_is_rejected_with_an_ndr_and_nothing_passes(relay, far, proxy) -> None:
    send(relay, BANK, f"ann@strip.{ZONE}", "strip-1")
    status, _ = ndr_status(ndr_for(far["customer"], "strip-1"))
    assert status == "5.7.10"
    assert proxy.connections >= 1 and proxy.stripped >= 1  # it did hide STARTTLS
    assert not mail_from_logged(far["stripped"], BANK), far["stripped"].log_tail()
    line = [x for x in relay.log_path.read_text().splitlines() if "<ann@strip" in x][-1]
    assert "STARTTLS not offered" in line and "status=bounced" in line


def test_next_mx_with_tls_is_used(relay, far) -> None:
    send(relay, BANK, f"ann@multi.{ZONE}", "multi-1")
    assert delivered(far["valid"], "multi-1").tls
    assert not mail_from_logged(far["notls"], BANK)


def test_no_rule_is_opportunistic_and_cleartext_still_works(relay, far) -> None:
    send(relay, SHOP, f"ann@notls.{ZONE}", "plain-1")
    got = delivered(far["notls"], "plain-1")
    assert not got.tls and got.mail_from == SHOP
    line = [x for x in relay.log_path.read_text().splitlines() if "<ann@notls" in x][-1]
    assert "tls=none" in line and "status=sent" in line


def test_held_mail_goes_once_released_after_the_far_end_is_fixed(relay, far, test_ca) -> None:
    queue_id = send(relay, BANK, f"ann@fixme.{ZONE}", "fixme-1")
    queue_entry(relay, queue_id, "held")
    shown = smg("queue", "show", queue_id, "--config", str(relay.config_path))
    assert shown.returncode == 0 and "held (tls)" in shown.stdout, shown
    assert "STARTTLS not offered" in shown.stdout
    fixme = far["fixme"]
    assert not mail_from_logged(fixme, BANK)
    # The partner fixes its server: STARTTLS with a valid certificate.
    fixme.stop()
    fixme.tls, fixme.certificate = "valid", test_ca.valid(fixme.hostname)
    fixme.start()
    released = smg("queue", "release", queue_id, "--config", str(relay.config_path))
    assert released.returncode == 0, released
    got = delivered(fixme, "fixme-1")
    assert got.tls and got.mail_from == BANK
    wait_for(lambda: all(m.id != queue_id for m in relay.queued()), 10, what="dequeued")


def test_held_mail_is_retried_then_bounced_at_the_end_of_its_lifetime(
    zone, port, far, test_ca, tmp_path
) -> None:
    """A relay of its own with a 4 s lifetime and a 1 s TLS retry: held, retried, bounced."""
    config = base_config(tmp_path, zone.nameserver, hostname="gw.smg-test.example")
    config["gateway"]["source_address"] = SOURCE
    config["delivery"] = {"port": port, "max_lifetime": "4s", "scan_interval": "200ms"}
    config["tls_policy"] = {"ca_bundle": str(test_ca.ca_bundle), "hold_retry": "1s"}
    config["mta_sts"] = {"enabled": False}
    relay = TlsRelay(tmp_path, config, RULES)
    relay.start()
    try:
        queue_id = send(relay, BANK, f"ann@expired.{ZONE}", "lifetime-1")
        assert queue_entry(relay, queue_id, "held").hold_reason == "tls"
        status, text = ndr_status(ndr_for(far["customer"], "lifetime-1"))
    finally:
        relay.stop()
    assert status in ("4.7.10", "5.7.10") and "no TLS connection could be established" in text
    attempts = [x for x in relay.log_path.read_text().splitlines() if "<ann@expired" in x]
    assert len(attempts) >= 3, attempts  # retried on tls_policy.hold_retry until it expired
    assert "status=bounced" in attempts[-1] and "expired" in attempts[-1]
    assert not mail_from_logged(far["expired"], BANK)


def test_the_known_failure_is_shared_by_all_workers(zone, port, far, test_ca, tmp_path) -> None:
    """``gateway.workers = 2``: the worker that saw the TLS failure is rarely the one that
    takes the next session; every session must still get 550 5.7.10."""
    config = base_config(tmp_path, zone.nameserver, hostname="gw.smg-test.example", workers=2)
    config["gateway"]["source_address"] = SOURCE
    config["delivery"] = {"port": port, "scan_interval": "200ms"}
    config["tls_policy"] = {"ca_bundle": str(test_ca.ca_bundle), "session_probe": False}
    config["mta_sts"] = {"enabled": False}
    relay = TlsRelay(tmp_path, config, RULES)
    relay.start()
    try:
        send(relay, BANK, f"ann@wrongname.{ZONE}", "workers-1")
        ndr_for(far["customer"], "workers-1")
        refused = [
            swaks(relay.endpoint, to=f"ann@wrongname.{ZONE}", mail_from=BANK) for _ in range(16)
        ]
    finally:
        relay.stop()
    assert all(server_said(r.transcript, "550 5.7.10") for r in refused)
    lines = [x for x in relay.log_path.read_text().splitlines() if "reason=tls_known_failure" in x]
    pids = {x.split("smg[", 1)[1].split("]", 1)[0] for x in lines}
    assert len(lines) == 16 and len(pids) == 2, pids  # both workers refused
