"""The spam rule and the good gateway's DATA stage with the REAL rspamd (GTUBE is spam).

Rerouting through two real relay instances: tests/integration/test_routing.py.
"""

from __future__ import annotations

import socket
from email.utils import formatdate, make_msgid

import pytest

from gateway.config import Config, parse_config
from gateway.policy import headers
from gateway.policy.build import build_chain
from gateway.policy.chain import Action, MessageContext, Stage
from gateway.policy.cleanup import Cleanup
from gateway.policy.rules.verdict import parse_verdict
from gateway.scanners.rspamd import RspamdClient
from gateway.services import build_services
from tests.harness.rspamd import GTUBE, Rspamd

pytestmark = pytest.mark.integration


def business_mail(subject: str = "Minutes of the planning meeting", extra: bytes = b"") -> bytes:
    head = (
        f"From: Alice Example <alice@example.com>\r\n"
        f"To: Bob Example <bob@example.net>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {make_msgid(domain='example.com')}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    ).encode()
    body = (
        b"Hello Bob,\r\n\r\nattached are the minutes of Monday's planning meeting. We agreed\r\n"
        b"to move the release to the second week of March and to review the budget\r\n"
        b"on Thursday. Please send me your comments by Wednesday.\r\n\r\n"
        b"Kind regards,\r\nAlice\r\n"
    )
    return head + body + extra


def gtube_mail() -> bytes:
    return business_mail("Special offer", b"\r\n" + GTUBE + b"\r\n")


def config(url: str, **spam: object) -> Config:
    return parse_config(
        {
            "gateway": {"hostname": "mta01.example.net", "role": "good"},
            "virus": {"enabled": False},
            "spam": {"rspamd_url": url, "timeout": "10s", **spam},
            "routing": {"bad_gateways": ["127.0.0.31:25"], "good_gateways": ["127.0.0.21"]},
        }
    )


def ctx(data: bytes, client_ip: str = "127.0.0.5") -> MessageContext:
    return MessageContext(
        client_ip=client_ip,
        helo="client.example.com",
        mail_from="alice@example.com",
        rcpt_tos=["bob@example.net"],
        data=data,
    )


async def test_gtube_is_spam_and_rerouted_with_its_verdict(rspamd: Rspamd) -> None:
    cfg = config(rspamd.url)
    services = build_services(cfg)
    chain = build_chain(cfg, services)
    message = ctx(gtube_mail())
    decision = await chain.run(Stage.DATA, message)
    assert decision.action == Action.REROUTE and decision.decided_by == "route"
    verdict = message.facts["spam"]
    assert verdict["is_spam"] and verdict["score"] >= 15 and verdict["action"] == "reject"
    assert "GTUBE" in verdict["symbols"]
    queued = await Cleanup(services).prepare(message, decision)
    (value,) = headers.get_values(queued, cfg.routing.verdict_header)
    parsed, by = parse_verdict(value)  # type: ignore[misc]
    assert by == "mta01.example.net" and "GTUBE" in parsed["symbols"]


async def test_business_mail_is_ham_and_delivered_directly(rspamd: Rspamd) -> None:
    cfg = config(rspamd.url)
    message = ctx(business_mail())
    decision = await build_chain(cfg, build_services(cfg)).run(Stage.DATA, message)
    assert decision.action == Action.ACCEPT, message.facts["spam"]
    assert not message.facts["spam"]["is_spam"]
    assert message.facts["spam"]["action"] == "no action"


async def test_forged_ham_verdict_does_not_save_gtube(rspamd: Rspamd) -> None:
    cfg = config(rspamd.url)
    forged = (
        b"X-SMG-Verdict: ham; score=0; required=6; action=no action; by=mta02.example.net; "
        b"symbols=\r\n" + gtube_mail()
    )
    message = ctx(forged, client_ip="127.0.0.21")  # even from a good gateway's address
    services = build_services(cfg)
    decision = await build_chain(cfg, services).run(Stage.DATA, message)
    assert decision.action == Action.REROUTE
    queued = await Cleanup(services).prepare(message, decision)
    (value,) = headers.get_values(queued, "X-SMG-Verdict")
    assert value.startswith("spam;") and "by=mta01.example.net" in value


async def test_client_follows_rspamds_connection_close(rspamd: Rspamd) -> None:
    # rspamd 3.4's normal worker answers "Connection: close": nothing is kept idle.
    client = RspamdClient(rspamd.url, timeout=10)
    for _ in range(3):
        reply = await client.check(business_mail(), ip="127.0.0.5", user="alice@example.com")
        assert reply["action"] == "no action"
    assert client._idle == []
    await client.close()


async def test_rspamd_down_is_451_unless_fail_open() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    cfg = config(dead)
    decision = await build_chain(cfg, build_services(cfg)).run(Stage.DATA, ctx(business_mail()))
    assert decision.action == Action.TEMPFAIL and decision.decided_by == "spam"
    assert str(decision.reply).startswith("451 4.7.0")
    cfg = config(dead, fail_open=True)
    decision = await build_chain(cfg, build_services(cfg)).run(Stage.DATA, ctx(gtube_mail()))
    assert decision.action == Action.ACCEPT


def test_rspamd_url_may_be_a_unix_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    import asyncio

    from tests.harness import free_port

    socket_dir = tmp_path_factory.mktemp("rspamd-unix")
    socket_dir.chmod(0o777)  # rspamd's workers run as _rspamd and create the socket here
    path = socket_dir / "normal.sock"
    daemon = Rspamd()
    daemon.port, daemon.controller_port = free_port(), free_port()
    daemon.local_d["worker-normal.inc"] = (
        f'bind_socket = "127.0.0.1:{daemon.port}";\nbind_socket = "{path} mode=0666";\ncount = 1;\n'
    )
    daemon.start()
    try:
        cfg = config(f"unix:{path}")
        message = ctx(gtube_mail())
        decision = asyncio.run(build_chain(cfg, build_services(cfg)).run(Stage.DATA, message))
        assert decision.action == Action.REROUTE and message.facts["spam"]["is_spam"]
    finally:
        daemon.close()
