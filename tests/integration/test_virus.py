"""The virus rule and the info NDR with the REAL clamd (test signature DB detecting EICAR).

In-process: the rule, the DATA stage of the real chain and the cleanup step's information NDR into
a real spool.  Through `smg serve` (SMTP in, NDR out at a sink): tests/integration/test_routing.py.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.config import Config, parse_config
from gateway.policy.build import build_chain
from gateway.policy.chain import Action, MessageContext, Stage
from gateway.policy.cleanup import Cleanup
from gateway.policy.rules.virus import VirusRule
from gateway.queue.spool import Spool
from gateway.scanners.clamd import ClamdClient
from gateway.services import build_services
from tests.harness import EICAR, EICAR_SIGNATURE_PREFIX, Clamd, KnotDNS

pytestmark = pytest.mark.integration

CLIENT = "127.0.0.5"  # the sending customer's host
OTHER_CLIENT = "127.0.0.77"  # another customer's network, also in gateway.client_networks
_RUN = uuid.uuid4().hex[:8]
LEGIT = f"notice-legit-{_RUN}.test"  # its MX host is the client itself
FORGED = f"notice-forged-{_RUN}.test"  # its MX host is in the other customer's network
SENDER = f"alice@{LEGIT}"

BUSINESS = (
    b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: minutes\r\n"
    b"Message-ID: <minutes-1@example.com>\r\n\r\nThe minutes of Monday's meeting.\r\n"
)


def eicar_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.net"
    msg["Subject"] = "invoice 4711"
    msg["Message-ID"] = "<invoice-4711@example.com>"
    msg.set_content("Please find the invoice attached.\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="inv.com")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def eicar_plain() -> bytes:
    return BUSINESS.replace(b"minutes\r\n", b"plain\r\n", 1) + EICAR + b"\r\n"


def config(
    clamd: Clamd, endpoint: str = "unix", nameserver: str = "127.0.0.1:9", **virus: object
) -> Config:
    where = f"unix:{clamd.socket_path}" if endpoint == "unix" else f"tcp:{clamd.tcp}"
    return parse_config(
        {
            "gateway": {
                "hostname": "mta01.example.net",
                "client_networks": [f"{CLIENT}/32", f"{OTHER_CLIENT}/32"],
            },
            "dns": {"nameservers": [nameserver], "timeout": "2s"},
            "virus": {"clamd": where, "timeout": "10s", **virus},
            "spam": {"enabled": False},
        }
    )


def ctx(data: bytes, mail_from: str = SENDER) -> MessageContext:
    return MessageContext(
        client_ip=CLIENT,
        helo="client.example.com",
        mail_from=mail_from,
        rcpt_tos=["bob@example.net", "carol@example.org"],
        data=data,
    )


@pytest.fixture(scope="module")
def sender_zones(knot_dns: KnotDNS) -> Iterator[str]:
    """The sender domains of the notice tests; the nameserver to use."""
    knot_dns.set_zone(LEGIT, f"@ MX 10 mx\nmx A {CLIENT}\n")
    knot_dns.set_zone(FORGED, f"@ MX 10 mx\nmx A {OTHER_CLIENT}\n@ A 127.0.0.78\n")
    yield knot_dns.nameserver
    knot_dns.remove_zone(LEGIT)
    knot_dns.remove_zone(FORGED)


@pytest.mark.parametrize("endpoint", ["unix", "tcp"])
@pytest.mark.parametrize("make", [eicar_plain, eicar_attachment], ids=["plain", "base64"])
async def test_eicar_is_rejected_naming_the_virus(clamd: Clamd, endpoint: str, make) -> None:
    chain = build_chain(config(clamd, endpoint), build_services(config(clamd, endpoint)))
    decision = await chain.run(Stage.DATA, ctx(make()))
    assert decision.action == Action.REJECT and decision.decided_by == "virus"
    assert decision.reply is not None
    assert str(decision.reply).startswith(f"554 5.7.1 Virus found: {EICAR_SIGNATURE_PREFIX}")


async def test_clean_mail_passes_the_virus_rule(clamd: Clamd) -> None:
    result = await VirusRule(ClamdClient(f"tcp:{clamd.tcp}", 10)).evaluate(ctx(BUSINESS))
    assert result.action is None and result.summary == "clean"


async def test_clamd_down_is_451_never_accepted_unscanned(clamd_private: Clamd) -> None:
    cfg = config(clamd_private)
    chain = build_chain(cfg, build_services(cfg))
    clamd_private.stop()
    decision = await chain.run(Stage.DATA, ctx(BUSINESS))
    assert decision.action == Action.TEMPFAIL and decision.decided_by == "virus"
    assert str(decision.reply).startswith("451 4.7.0")
    clamd_private.start()
    assert (await chain.run(Stage.DATA, ctx(BUSINESS))).action == Action.ACCEPT


@pytest.mark.parametrize("endpoint", ["unix", "tcp"])
async def test_clamd_size_limit_is_451(clamd_private: Clamd, endpoint: str) -> None:
    clamd_private.stop()
    clamd_private.stream_max_length = "1K"
    clamd_private.start()
    rule = VirusRule(ClamdClient.from_config(config(clamd_private, endpoint).virus))
    big = BUSINESS + b"x" * 300_000 + b"\r\n"
    result = await rule.evaluate(ctx(big))
    assert result.action == Action.TEMPFAIL and str(result.reply).startswith("451 4.7.0")
    assert "StreamMaxLength" in result.summary


async def notice_for(
    clamd: Clamd, nameserver: str, spool_dir: Path, message: MessageContext
) -> bytes | None:
    """Run the real chain and the cleanup step's after_reject; the queued notice, if any."""
    cfg = config(clamd, nameserver=nameserver)
    spool = await Spool.open(spool_dir)
    try:
        services = build_services(cfg, spool=spool)
        chain, cleanup = build_chain(cfg, services), Cleanup(services)
        decision = await chain.run(Stage.DATA, message)
        assert decision.action == Action.REJECT and str(decision.reply).startswith("554 5.7.1")
        await cleanup.after_reject(message, decision)
        queued = [m for m in await spool.list() if m.kind == "ndr"]
        if not queued:
            return None
        (ndr,) = queued
        assert ndr.sender == "" and [r.address for r in ndr.recipients] == [message.mail_from]
        return (await spool.load(ndr.id)).data
    finally:
        await spool.close()


def quoted_headers(ndr: bytes) -> bytes:
    """The text/rfc822-headers part of a notice, up to its closing boundary."""
    part = ndr.split(b"Content-Type: text/rfc822-headers\r\n", 1)[1].split(b"\r\n\r\n", 1)[1]
    return part.rsplit(b"\r\n--=_smg_", 1)[0]


async def test_info_ndr_goes_into_the_real_spool(
    clamd: Clamd, sender_zones: str, tmp_path: Path
) -> None:
    ndr = await notice_for(clamd, sender_zones, tmp_path / "spool", ctx(eicar_attachment()))
    assert ndr is not None
    text = ndr.decode()
    assert f"Virus found in a message you sent: {EICAR_SIGNATURE_PREFIX}" in text
    for needle in ("invoice 4711", "<invoice-4711@example.com>", "bob@example.net",
                   "carol@example.org"):  # fmt: skip
        assert needle in text
    assert EICAR[:20] not in ndr and base64.b64encode(EICAR)[:20] not in ndr


async def test_no_notice_to_a_forged_sender(
    clamd: Clamd, sender_zones: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sender domain resolves to another customer's network (and to no network at all,
    and does not exist): no notice, and the log says why."""
    caplog.set_level(logging.INFO, "smg.pipeline")
    for sender in (f"spoofed@{FORGED}", f"nobody@nx-{_RUN}.test"):
        message = ctx(eicar_attachment(), mail_from=sender)
        assert await notice_for(clamd, sender_zones, tmp_path / "spool", message) is None
        assert f"from <{sender}>: no information NDR" in caplog.text
        assert "does not resolve to the client's network 127.0.0.5/32" in caplog.text


async def test_notice_quotes_at_most_16_kib_of_headers(
    clamd: Clamd, sender_zones: str, tmp_path: Path
) -> None:
    """45 KB of headers (the review's case): the notice quotes whole fields, <= 16 KiB."""
    filler = b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"f" * 80) for i in range(480))
    data = eicar_attachment().replace(b"\r\n\r\n", b"\r\n" + filler + b"\r\n", 1)
    assert data.index(b"\r\n\r\n") > 45_000
    ndr = await notice_for(clamd, sender_zones, tmp_path / "spool", ctx(data))
    assert ndr is not None
    quoted = quoted_headers(ndr)
    assert 12 * 1024 < len(quoted) <= 16 * 1024
    assert quoted.startswith(b"From: alice@example.com\r\n") and quoted.endswith(b"\r\n")
    assert b"X-Filler-0000" in quoted and b"X-Filler-0479" not in quoted
    assert len(ndr) < 16 * 1024 + 4096  # the whole notice, not 47 KB
    assert "invoice 4711" in ndr.decode()


async def test_eicar_in_a_header_is_never_quoted(
    clamd: Clamd, sender_zones: str, tmp_path: Path
) -> None:
    data = BUSINESS.replace(b"Subject: minutes", b"Subject: " + EICAR, 1)
    data = data.replace(b"To: ", b"X-Payload: " + EICAR + b"\r\nTo: ", 1)
    ndr = await notice_for(clamd, sender_zones, tmp_path / "spool", ctx(data))
    assert ndr is not None  # the sender is legitimate: told, without the virus
    assert f"Virus found in a message you sent: {EICAR_SIGNATURE_PREFIX}" in ndr.decode()
    assert EICAR[:20] not in ndr and quoted_headers(ndr) == b""
