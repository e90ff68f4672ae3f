"""The intake in process, with fake neighbours (spool, DNS): protocol rules.

The same behaviour is shown against the real ``smg serve`` process with swaks and knot in
tests/integration/test_intake*.py; these run in about a second and cover the corners.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.dns import Resolver
from gateway.intake import Intake, Runtime
from gateway.metrics import Metrics
from gateway.policy.chain import Action, Chain, Decision, MessageContext, Reply, RuleResult, Stage
from gateway.policy.cleanup import Cleanup
from gateway.policy.rules.recipient import RecipientRule
from gateway.policy.rules.relay_control import RelayControlRule
from gateway.policy.rules.sender_domain import SenderDomainRule
from gateway.queue.spool import SpoolFull, SpoolUnavailable
from gateway.services import Services
from tests.unit.fakedns import FakeZone, start_fake_dns


class FakeSpool:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail: Exception | None = None

    async def enqueue(self, mail_from: str, rcpt_tos: list[str], data: bytes, **kw: Any) -> str:
        if self.fail is not None:
            raise self.fail
        self.messages.append(
            {"mail_from": mail_from, "rcpt_tos": list(rcpt_tos), "data": data, **kw}
        )
        return f"TESTQ{len(self.messages)}"


class RecordingCleanup(Cleanup):
    """The real cleanup step, remembering which rule's rejections it cleaned up after."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.rejected: list[str] = []

    async def after_reject(self, ctx: MessageContext, decision: Decision) -> None:
        self.rejected.append(decision.decided_by)
        await super().after_reject(ctx, decision)


class BodyRule:
    """DATA rule for tests: the body word decides."""

    name = "body"
    stage = Stage.DATA

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        if b"VIRUS" in ctx.data:
            return RuleResult(self.name, "bad", Action.REJECT, Reply(554, "5.7.1", "Virus found"))
        if b"SPAM" in ctx.data:
            return RuleResult(self.name, "spam", Action.REROUTE)
        if b"HOLDME" in ctx.data:
            return RuleResult(self.name, "hold", Action.HOLD)
        return RuleResult(self.name, "ok", Action.ACCEPT)


@dataclasses.dataclass
class Relay:
    intake: Intake
    spool: FakeSpool
    cleanup: RecordingCleanup
    port: int
    metrics: Metrics


GATEWAY = {
    "hostname": "gw.example.net",
    "role": "bad",
    "client_networks": ["127.0.0.0/29"],
    "max_message_size": 2000,
    "max_recipients": 3,
    "max_connections": 3,
    "idle_timeout": "1s",
    "data_timeout": "2s",
    "max_line_length": 100,
}


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    zone = FakeZone()
    zone.add("example.net", "MX", "10 mx.example.net.")
    zone.add("mx.example.net", "A", "127.0.0.10")
    zone.add("private.test", "A", "10.0.0.1")
    zone.silent.add("slow.test")
    transport, dns_port = await start_fake_dns(zone)
    config = parse_config(
        {
            "gateway": GATEWAY,
            "dns": {
                "nameservers": [f"127.0.0.1:{dns_port}"],
                "extra_public_networks": ["127.0.0.0/8"],
                "timeout": "300ms",
            },
        }
    )
    config = dataclasses.replace(
        config, gateway=dataclasses.replace(config.gateway, listen=[("127.0.0.1", 0)])
    )
    spool, metrics = FakeSpool(), Metrics()
    services = Services(config, resolver=Resolver(config.dns), spool=spool, metrics=metrics)
    cleanup = RecordingCleanup(services)
    chain = Chain(
        [
            RelayControlRule(config.gateway.client_networks),
            SenderDomainRule(services.resolver),
            RecipientRule(config.gateway.max_recipients),
            BodyRule(),
        ]
    )
    intake = Intake(services, Runtime(config, chain, cleanup))
    await intake.start()
    yield Relay(intake, spool, cleanup, intake.addresses[0][1], metrics)
    await intake.stop(grace=1)
    transport.close()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, source: str = "127.0.0.1") -> tuple[Client, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if not line:
                return "\n".join(lines) or "<closed>"
            lines.append(line.decode().rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> str:
        raw = line if isinstance(line, bytes) else line.encode()
        await self.send(raw + b"\r\n")
        return await self.reply()

    async def start_mail(self, sender: str = "a@example.net", rcpt: str = "b@example.net") -> None:
        assert (await self.cmd("EHLO client.example.net")).startswith("250")
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
        assert (await self.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await self.cmd("DATA")).startswith("354")

    def close(self) -> None:
        self.writer.close()


MESSAGE = b"From: a@example.net\r\nTo: b@example.net\r\nSubject: t\r\n\r\nHello.\r\n"


async def test_accepts_and_queues_with_received_header(relay: Relay) -> None:
    client, banner = await Client.connect(relay.port)
    assert banner.startswith("220 gw.example.net ESMTP")
    ehlo = await client.cmd("EHLO client.example.net")
    for capability in ("SIZE 2000", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"):
        assert capability in ehlo
    assert "AUTH" not in ehlo and "STARTTLS" not in ehlo
    assert (await client.cmd("MAIL FROM:<a@example.net> SIZE=100")).startswith("250 2.1.0")
    assert (await client.cmd("RCPT TO:<b@example.net>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    reply = await client.cmd(MESSAGE + b"..dot\r\n.")
    assert reply == "250 2.0.0 Ok: queued as TESTQ1"
    queued = relay.spool.messages[0]
    assert queued["mail_from"] == "a@example.net" and queued["rcpt_tos"] == ["b@example.net"]
    assert queued["data"].startswith(b"Received: from client.example.net ([127.0.0.1])")
    assert queued["data"].endswith(MESSAGE + b".dot\r\n")
    assert queued["route"] == "direct" and queued["state"] == "active"
    assert relay.metrics.value("received") == 1
    assert (await client.cmd("QUIT")).startswith("221 2.0.0")


async def test_reroute_and_hold_reach_the_spool(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    assert (await client.cmd(b"Subject: SPAM\r\n\r\nx\r\n.")).startswith("250 2.0.0")
    await client.start_mail()
    assert (await client.cmd(b"Subject: HOLDME\r\n\r\nx\r\n.")).startswith("250 2.0.0")
    assert [m["route"] for m in relay.spool.messages] == ["bad_gateway", "direct"]
    assert [m["state"] for m in relay.spool.messages] == ["active", "held"]


async def test_data_reject_runs_after_reject(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    assert (await client.cmd(b"Subject: VIRUS\r\n\r\nx\r\n.")) == "554 5.7.1 Virus found"
    assert relay.cleanup.rejected == ["body"] and relay.spool.messages == []
    await client.start_mail()  # the session goes on
    assert (await client.cmd(MESSAGE + b".")).startswith("250")


async def test_relay_control_at_connect(relay: Relay) -> None:
    client, banner = await Client.connect(relay.port, source="127.0.0.9")
    assert banner.startswith("554 5.7.1 Relay access denied: 127.0.0.9")
    assert await client.reply() == "<closed>"
    assert relay.metrics.value("connections_refused", reason="relay_control") == 1


async def test_max_connections(relay: Relay) -> None:
    clients = [await Client.connect(relay.port) for _ in range(3)]
    extra, banner = await Client.connect(relay.port)
    assert banner.startswith("421 4.7.0") and await extra.reply() == "<closed>"
    clients[0][0].close()
    await asyncio.sleep(0.1)
    _again, banner = await Client.connect(relay.port)
    assert banner.startswith("220")


async def test_sender_checks(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    assert (await client.cmd("MAIL FROM:<a@nope.test>")).startswith(
        "550 5.1.8 Sender Domain must resolve"
    )
    assert (await client.cmd("MAIL FROM:<a@private.test>")).startswith("550 5.1.8")
    assert (await client.cmd("MAIL FROM:<a@slow.test>")).startswith("451 4.4.3")
    assert (await client.cmd("MAIL FROM:<a@example.net")).startswith("501 5.1.7")
    assert (await client.cmd("MAIL FROM:<>")).startswith("250")
    assert (await client.cmd("MAIL FROM:<>")).startswith("503 5.5.1")


async def test_size_declared_and_real(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    assert (await client.cmd("MAIL FROM:<a@example.net> SIZE=2001")).startswith("552 5.3.4")
    await client.start_mail()
    big = b"Subject: big\r\n\r\n" + (b"x" * 80 + b"\r\n") * 40
    assert (await client.cmd(big + b".")).startswith("552 5.3.4")
    assert relay.spool.messages == []
    await client.start_mail()  # the session goes on
    assert (await client.cmd(MESSAGE + b".")).startswith("250")


async def test_recipient_limit_and_tricks(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<a@example.net>")
    for i in range(3):
        assert (await client.cmd(f"RCPT TO:<r{i}@example.net>")).startswith("250")
    assert (await client.cmd("RCPT TO:<r9@example.net>")).startswith("452 4.5.3")
    assert (await client.cmd("RSET")).startswith("250 2.0.0")
    await client.cmd("MAIL FROM:<a@example.net>")
    assert (await client.cmd("RCPT TO:<@hop.example:u@example.net>")).startswith("550 5.7.1")
    assert (await client.cmd("RCPT TO:<u%v.example@example.net>")).startswith("550 5.7.1")
    assert (await client.cmd('RCPT TO:<"u@v.example"@example.net>')).startswith("550 5.7.1")
    assert (await client.cmd("RCPT TO:<v.example!u@example.net>")).startswith("550 5.7.1")
    assert (await client.cmd("RCPT TO:<u@example.net> NOTIFY=NEVER")).startswith("555 5.5.4")
    assert (await client.cmd("RCPT TO:<u@@example.net>")).startswith("553 5.1.3")


@pytest.mark.parametrize(
    "trick",
    [
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\n.\r",
    ],
)
async def test_smuggling_never_ends_data_early(relay: Relay, trick: bytes) -> None:
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    smuggled = (
        b"Subject: first\r\n\r\nbody" + trick + b"MAIL FROM:<evil@example.net>\r\n"
        b"RCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"
    )
    await client.send(smuggled + b".\r\n")
    reply = await client.reply()
    assert reply.startswith("550 5.6.11"), reply  # one reply for the whole thing
    assert relay.spool.messages == []
    assert (await client.cmd("NOOP")).startswith("250")  # the session goes on, in step


async def test_pipelined_commands_after_data_stay_in_step(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    await client.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert [await client.reply() for _ in range(3)][2].startswith("354")
    await client.send(MESSAGE + b".\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<c@example.net>\r\n")
    replies = [await client.reply() for _ in range(3)]
    assert replies[0].startswith("250 2.0.0 Ok: queued") and replies[2].startswith("250 2.1.5")


async def test_empty_message_and_lone_dot_lines(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    assert (await client.cmd(b".")).startswith("250")
    assert relay.spool.messages[0]["data"].endswith(b"\r\n")  # only the Received: header
    await client.start_mail()
    assert (await client.cmd(b"a.\r\n..\r\nb\r\n.")).startswith("250")
    assert relay.spool.messages[1]["data"].endswith(b"a.\r\n.\r\nb\r\n")


async def test_long_lines(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    assert (await client.cmd(b"Subject: x\r\n\r\n" + b"y" * 101 + b"\r\n.")).startswith("550 5.6.0")
    assert (await client.cmd("NOOP " + "z" * 600)).startswith("500 5.5.2")
    assert (await client.cmd("NOOP")).startswith("250")


async def test_smtputf8(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    assert (await client.cmd("MAIL FROM:<jörg@example.net>")).startswith("553 5.6.7")
    assert (await client.cmd("MAIL FROM:<jörg@example.net> SMTPUTF8")).startswith("250")
    assert (await client.cmd("RCPT TO:<dörte@example.net>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd("Subject: ü\r\n\r\nü\r\n.".encode())).startswith("250")
    assert relay.spool.messages[0]["facts"]["smtputf8"] is True
    assert b"with UTF8SMTP" in relay.spool.messages[0]["data"]
    await client.cmd("MAIL FROM:<a@example.net>")
    assert (await client.cmd("RCPT TO:<dörte@example.net>")).startswith("553 5.6.7")


async def test_malformed_commands_keep_the_session(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    assert (await client.cmd("MAIL FROM:<a@example.net>")).startswith("503")
    assert (await client.cmd("EHLO c")).startswith("250")
    assert (await client.cmd("FOO bar")).startswith("500 5.5.2")
    assert (await client.cmd("MAIL TO:<a@example.net>")).startswith("501 5.5.4")
    assert (await client.cmd("MAIL FROM:<a@example.net> FOO=1")).startswith("555 5.5.4")
    assert (await client.cmd("RCPT TO:<b@example.net>")).startswith("503 5.5.1")
    assert (await client.cmd("DATA")).startswith("503 5.5.1")
    assert (await client.cmd("AUTH PLAIN AAAA")).startswith("502 5.5.1")
    assert (await client.cmd("NOOP")).startswith("250")


async def test_spool_unavailable_is_a_4xx(relay: Relay) -> None:
    relay.spool.fail = SpoolFull("spool /x: database or disk is full")
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    assert (await client.cmd(MESSAGE + b".")).startswith("452 4.3.1")
    relay.spool.fail = SpoolUnavailable("spool /x: attempt to write a readonly database")
    await client.start_mail()
    assert (await client.cmd(MESSAGE + b".")).startswith("451 4.3.0")


async def test_idle_timeout(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    started = asyncio.get_running_loop().time()
    assert (await client.reply()).startswith("421 4.4.2")
    assert 0.8 < asyncio.get_running_loop().time() - started < 3


async def test_data_timeout_bounds_a_slow_client(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    started = asyncio.get_running_loop().time()
    for _ in range(30):  # a line every 0.5 s would keep an idle timer alive forever
        try:
            await client.send(b"x\r\n")
        except ConnectionError:
            break
        await asyncio.sleep(0.2)
        if client.reader.at_eof():
            break
    assert 1.5 < asyncio.get_running_loop().time() - started < 4
    assert relay.spool.messages == []


async def test_stop_closes_idle_sessions(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    await relay.intake.stop(grace=1)
    assert (await client.reply()).startswith("421 4.3.2")


async def test_oversized_message_read_past_the_buffer_then_session_goes_on(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    # 40 KB without any ".<CRLF>": the reader's buffer overruns several times
    await client.send(b"Subject: huge\r\n\r\n" + (b"y" * 78 + b"\r\n") * 500)
    assert (await client.cmd(b".")).startswith("552 5.3.4")
    await client.start_mail()
    assert (await client.cmd(MESSAGE + b".")).startswith("250")


async def test_command_line_without_end_is_bounded(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    assert (await client.cmd(b"NOOP " + b"n" * 50000)).startswith("500 5.5.2")
    assert (await client.cmd("NOOP")).startswith("250")


async def test_body_8bitmime(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    assert (await client.cmd("MAIL FROM:<a@example.net> BODY=8BITMIME")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.net>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd("Subject: x\r\n\r\nGr\xfc\xdfe\r\n.".encode("latin-1"))).startswith(
        "250"
    )
    assert relay.spool.messages[0]["facts"]["body"] == "8BITMIME"
    assert relay.spool.messages[0]["data"].endswith(b"Gr\xfc\xdfe\r\n")
    assert (await client.cmd("MAIL FROM:<a@example.net> BODY=BINARYMIME")).startswith("555")


async def test_invalid_utf8_address_is_refused(relay: Relay) -> None:
    client, _ = await Client.connect(relay.port)
    await client.cmd("EHLO c")
    reply = await client.cmd(b"MAIL FROM:<j\xffrg@example.net> SMTPUTF8")
    assert reply.startswith("553 5.6.7 The sender address is not valid UTF-8")
    assert (await client.cmd("MAIL FROM:<a@example.net> SMTPUTF8")).startswith("250")
    assert (await client.cmd(b"RCPT TO:<d\xc3@example.net>")).startswith("553 5.6.7")
