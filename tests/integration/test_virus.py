"""The virus rule and the info NDR with the REAL clamd (test signature DB detecting EICAR).

In-process: the rule, the DATA stage of the real chain and the cleanup step's information NDR into
a real spool.  Through `smg serve` (SMTP in, NDR out at a sink): tests/integration/test_routing.py.
"""

from __future__ import annotations

import base64
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
from tests.harness import EICAR, EICAR_SIGNATURE_PREFIX, Clamd

pytestmark = pytest.mark.integration

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


def config(clamd: Clamd, endpoint: str = "unix", **virus: object) -> Config:
    where = f"unix:{clamd.socket_path}" if endpoint == "unix" else f"tcp:{clamd.tcp}"
    return parse_config(
        {
            "gateway": {"hostname": "mta01.example.net"},
            "virus": {"clamd": where, "timeout": "10s", **virus},
            "spam": {"enabled": False},
        }
    )


def ctx(data: bytes) -> MessageContext:
    return MessageContext(
        client_ip="127.0.0.5",
        helo="client.example.com",
        mail_from="alice@example.com",
        rcpt_tos=["bob@example.net", "carol@example.org"],
        data=data,
    )


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


async def test_info_ndr_goes_into_the_real_spool(clamd: Clamd, tmp_path: Path) -> None:
    cfg = config(clamd)
    spool = await Spool.open(tmp_path / "spool")
    try:
        services = build_services(cfg, spool=spool)
        chain, cleanup = build_chain(cfg, services), Cleanup(services)
        message = ctx(eicar_attachment())
        decision = await chain.run(Stage.DATA, message)
        await cleanup.after_reject(message, decision)
        (queued,) = [m for m in await spool.list() if m.kind == "ndr"]
        ndr = (await spool.load(queued.id)).data
    finally:
        await spool.close()
    assert queued.sender == "" and [r.address for r in queued.recipients] == ["alice@example.com"]
    text = ndr.decode()
    assert f"Virus found in a message you sent: {EICAR_SIGNATURE_PREFIX}" in text
    for needle in ("invoice 4711", "<invoice-4711@example.com>", "bob@example.net",
                   "carol@example.org"):  # fmt: skip
        assert needle in text
    assert EICAR[:20] not in ndr and base64.b64encode(EICAR)[:20] not in ndr
