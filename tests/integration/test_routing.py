"""Good/bad routing end to end: two real `smg serve` instances, real clamd, rspamd, knot DNS and
a Postfix far end, swaks as the customer.

    swaks (127.0.0.1 customer, 127.0.0.170 untrusted peer)
      -> good gateway 127.0.0.151 (role good: virus, spam, route, DKIM)
           ham  ---------------------------------------------> far end 127.0.0.160
           spam -> bad gateway 127.0.0.152 (STARTTLS verified) -> far end 127.0.0.160

Each gateway sends from its own address (`gateway.source_address`), so the far end's record of
the client address says which gateway delivered.  The far end also is the MX of the sender
domain: NDRs and the virus information mail arrive there too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_binaries
from tests.harness import EICAR, EICAR_SIGNATURE_PREFIX, Clamd, TestCA, free_port
from tests.harness.knot import KnotDNS
from tests.harness.postfix import PostfixFarEnd, ReceivedMessage
from tests.harness.rspamd import GTUBE, Rspamd
from tests.harness.swaks import swaks
from tests.integration.smg_relay import SmgRelay
from tests.integration.test_dkim import keygen, opendkim_verify

pytestmark = pytest.mark.integration

GOOD, BAD, FAR, UNTRUSTED = "127.0.0.151", "127.0.0.152", "127.0.0.160", "127.0.0.170"
SENDER_DOMAIN, FAR_DOMAIN = "smg-routing.test", "far-routing.test"
ALICE = f"alice@{SENDER_DOMAIN}"
BOB, NOBODY = f"bob@{FAR_DOMAIN}", f"nobody@{FAR_DOMAIN}"
VERDICT = "X-SMG-Verdict"


def toml(config: dict[str, dict[str, Any]]) -> str:
    """Sections of scalars/lists, and lists of tables as [[section.key]]."""
    lines: list[str] = []
    tables: list[str] = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                for item in value:
                    tables.append(f"[[{section}.{key}]]")
                    tables += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines + tables) + "\n"


class Relay(SmgRelay):
    def write_config(self) -> None:
        self.config_path.write_text(toml(self.config))


class Fleet:
    def __init__(self, good: Relay, bad: Relay, far: PostfixFarEnd, clamd: Clamd) -> None:
        self.good, self.bad, self.far, self.clamd = good, bad, far, clamd

    def send(
        self, data: bytes, to: str = BOB, via: Relay | None = None, client: str = "127.0.0.1"
    ) -> str:
        result = swaks((via or self.good).endpoint, to, ALICE, data=data, local_address=client)
        return result.transcript

    def arrived(self, tag: str, count: int = 1, timeout: float = 30) -> list[ReceivedMessage]:
        """The far end's messages whose bytes contain ``tag`` (once ``count`` are there)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.far.received() if tag.encode() in m.raw]
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise AssertionError(
            f"{count} message(s) with {tag!r} did not arrive\n--- good ---\n{self.good.log()}"
            f"\n--- bad ---\n{self.bad.log()}\n--- far end ---\n{self.far.log_tail()}"
        )


def mail(tag: str, body: str = "The minutes of Monday's planning meeting are attached.",
         headers: str = "") -> bytes:  # fmt: skip
    return (
        f"{headers}From: Alice <{ALICE}>\r\nTo: {BOB}\r\nSubject: {tag}\r\n"
        f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{tag}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Hello Bob,\r\n\r\n{body}\r\n\r\nKind regards,\r\nAlice\r\n"
    ).encode()


def spam(tag: str, **kw: str) -> bytes:
    return mail(tag, body=f"Special offer!\r\n{GTUBE.decode()}", **kw)


def new_tag(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    knot_dns: KnotDNS,
    rspamd: Rspamd,
    test_ca: TestCA,
) -> Iterator[Fleet]:
    require_binaries("swaks", "clamd")
    tmp = tmp_path_factory.mktemp("routing")
    key, zone_line = keygen(tmp / "keys", "route2026", "rsa", SENDER_DOMAIN)
    # The customer sends from 127.0.0.1 and its domain resolves there (an A record): it may
    # get virus notices (issue 12: only senders whose domain resolves to the client's network).
    knot_dns.set_zone(SENDER_DOMAIN, f"@ MX 10 mx\nmx A {FAR}\n@ A 127.0.0.1\n{zone_line}\n")
    knot_dns.set_zone(FAR_DOMAIN, f"@ MX 10 mx\nmx A {FAR}\n")
    clamd = Clamd()  # this module's own: one test stops it
    far = PostfixFarEnd(
        address=FAR, tls="none", reject_recipients={NOBODY: "550 5.1.1 no such user"}
    )
    clamd.start()
    far.start()
    leaf = test_ca.valid(BAD)
    common = {
        "dns": {"nameservers": [knot_dns.nameserver], "extra_public_networks": ["127.0.0.0/8"],
                "timeout": "2s"},
        "delivery": {"port": far.port, "retry_initial": "1s", "retry_max": "2s",
                     "scan_interval": "0.5s"},
        "virus": {"clamd": f"unix:{clamd.socket_path}", "timeout": "10s"},
    }  # fmt: skip
    good_port, bad_port = free_port(GOOD), free_port(BAD)
    good = Relay(
        _dir(tmp / "good"),
        {
            "gateway": {"hostname": f"good.{SENDER_DOMAIN}", "role": "good",
                        "listen": [f"{GOOD}:{good_port}"], "source_address": GOOD,
                        "spool": str(tmp / "good" / "spool"),
                        "client_networks": ["127.0.0.1/32", f"{UNTRUSTED}/32"]},
            **common,
            "spam": {"rspamd_url": rspamd.url},
            "routing": {"bad_gateways": [f"{BAD}:{bad_port}"], "good_gateways": [GOOD],
                        "internal_ca": str(test_ca.ca_bundle)},
            "dkim": {"keys": [{"domain": SENDER_DOMAIN, "selector": "route2026",
                               "key": str(key)}]},
        },
    )  # fmt: skip
    bad = Relay(
        _dir(tmp / "bad"),
        {
            "gateway": {"hostname": f"bad.{SENDER_DOMAIN}", "role": "bad",
                        "listen": [f"{BAD}:{bad_port}"], "source_address": BAD,
                        "spool": str(tmp / "bad" / "spool"),
                        "client_networks": [f"{GOOD}/32", f"{UNTRUSTED}/32"],
                        "tls_cert": str(leaf.cert_path), "tls_key": str(leaf.key_path)},
            **common,
            "routing": {"good_gateways": [GOOD]},
        },
    )  # fmt: skip
    try:
        bad.start()
        good.start()
        yield Fleet(good, bad, far, clamd)
    finally:
        good.stop()
        bad.stop()
        far.close()
        clamd.close()


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def header_names(message: ReceivedMessage) -> list[str]:
    return [name.lower() for name in message.message]


def test_ham_leaves_from_the_good_gateway_signed(fleet: Fleet, knot_dns: KnotDNS, tmp_path):
    tag = new_tag("ham")
    transcript = fleet.send(mail(tag))
    assert "250 2.0.0 Ok: queued as" in transcript, transcript
    (got,) = fleet.arrived(tag)
    assert got.client_address == GOOD
    assert VERDICT.lower() not in header_names(got)
    assert opendkim_verify(got.raw, knot_dns.nameserver, SENDER_DOMAIN, tmp_path) == {
        "route2026": "pass"
    }


def test_spam_leaves_from_the_bad_gateway_without_verdict(fleet: Fleet, knot_dns, tmp_path):
    tag = new_tag("spam")
    transcript = fleet.send(spam(tag))
    assert "250 2.0.0 Ok: queued as" in transcript, transcript
    (got,) = fleet.arrived(tag)
    assert got.client_address == BAD, "spam never leaves through a good gateway's address"
    assert VERDICT.lower() not in header_names(got)
    # Signed on the good gateway before routing: the signature survives the bad gateway.
    assert opendkim_verify(got.raw, knot_dns.nameserver, SENDER_DOMAIN, tmp_path) == {
        "route2026": "pass"
    }


def test_ndr_from_the_bad_gateway_says_why_it_was_spam(fleet: Fleet) -> None:
    tag = new_tag("spam-ndr")
    assert "250 2.0.0" in fleet.send(spam(tag), to=NOBODY)
    ndr = next(m for m in fleet.arrived(tag) if m.mail_from == "")
    assert ndr.client_address == BAD and ndr.rcpt_tos == (ALICE,)
    text = ndr.raw.decode(errors="replace")
    assert "classified as spam" in text and "GTUBE" in text, text
    assert "score 15" in text


def test_forged_verdict_from_an_untrusted_peer_is_ignored_and_stripped(fleet: Fleet) -> None:
    forged = f"{VERDICT}: spam; score=99; required=6; action=reject; by=good.{SENDER_DOMAIN}; symbols=FORGED_RULE:99\r\n"  # noqa: E501
    # Straight to the bad gateway from an address that is not a good gateway: the header
    # must not end up in the NDR's explanation, and must not leave the fleet.
    tag = new_tag("forged-bad")
    assert "250 2.0.0" in fleet.send(mail(tag, headers=forged), to=NOBODY, via=fleet.bad,
                                     client=UNTRUSTED)  # fmt: skip
    ndr = next(m for m in fleet.arrived(tag) if m.mail_from == "")
    assert (
        "FORGED_RULE"
        not in ndr.raw.decode(errors="replace").split("Content-Type: text/rfc822-headers")[0]
    )
    assert "classified as spam" not in ndr.raw.decode(errors="replace")
    # A forged "ham" verdict on GTUBE at the good gateway: still rerouted, header replaced.
    tag = new_tag("forged-good")
    ham_claim = f"{VERDICT}: ham; score=0; required=6; action=no action; by=x.test; symbols=\r\n"
    assert "250 2.0.0" in fleet.send(spam(tag, headers=ham_claim), client=UNTRUSTED)
    (got,) = fleet.arrived(tag)
    assert got.client_address == BAD and VERDICT.lower() not in header_names(got)


def test_virus_554_and_info_ndr_to_the_sender(fleet: Fleet) -> None:
    tag = new_tag("virus")
    data = mail(tag, body="Invoice attached.\r\n" + EICAR.decode())
    transcript = fleet.send(data, to=BOB)
    assert f"554 5.7.1 Virus found: {EICAR_SIGNATURE_PREFIX}" in transcript, transcript
    (info,) = fleet.arrived(tag)
    assert info.mail_from == "" and info.rcpt_tos == (ALICE,) and info.client_address == GOOD
    text = info.raw.decode(errors="replace")
    for needle in (EICAR_SIGNATURE_PREFIX, tag, f"<{tag}@{SENDER_DOMAIN}>", BOB):
        assert needle in text, needle
    assert EICAR[:20] not in info.raw
    assert not [m for m in fleet.far.received() if m.mail_from and tag.encode() in m.raw]


def test_clamd_down_is_451(fleet: Fleet) -> None:
    fleet.clamd.stop()
    try:
        transcript = fleet.send(mail(new_tag("clamd-down")))
        assert "451 4.7.0" in transcript, transcript
    finally:
        fleet.clamd.start()
    assert "250 2.0.0" in fleet.send(mail(new_tag("clamd-back")))


def test_bad_gateway_down_spam_waits_and_nothing_leaks(fleet: Fleet) -> None:
    fleet.bad.stop()
    try:
        spam_tag, ham_tag = new_tag("held-spam"), new_tag("meanwhile-ham")
        assert "250 2.0.0" in fleet.send(spam(spam_tag))
        assert "250 2.0.0" in fleet.send(mail(ham_tag))
        fleet.arrived(ham_tag)  # the good gateway works...
        time.sleep(5)  # ...through several retry rounds (retry 1-2 s) of the spam
        assert not [m for m in fleet.far.received() if spam_tag.encode() in m.raw]
        from_good = [m for m in fleet.far.received() if m.client_address == GOOD]
        assert not [m for m in from_good if GTUBE in m.raw], "no spam left via the good IP"
        waiting = [m for m in fleet.good.queued() if m.route == "bad_gateway"]
        assert len(waiting) == 1 and waiting[0].facts["spam"]["is_spam"]
    finally:
        fleet.bad.start()
    (got,) = fleet.arrived(spam_tag, timeout=40)
    assert got.client_address == BAD
