"""Delivery against in-process aiosmtpd far ends and a fake resolver (fake neighbours).

The far ends listen on distinct 127.0.21.x addresses on one common port (``delivery.port`` is
one port for every MX, as on the internet).  The real relay against knot DNS and Postfix/aiosmtpd
sinks is in tests/integration/test_delivery*.py.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from aiosmtpd.controller import Controller

from gateway.config import Config, parse_config
from gateway.delivery.client import data_block, strip_header
from gateway.delivery.scheduler import Delivery
from gateway.dns import DnsResult, MailHost, MailHosts, Resolver
from gateway.log import TextFormatter
from gateway.queue.admin import SpoolAdmin
from gateway.queue.spool import Spool
from gateway.tls.policy import TlsPolicy
from tests.harness import TestCA, common_port

SOURCE = "127.0.21.1"
PUBLIC_NET = "127.0.21.0/24"
HOSTNAME = "gw1.example.net"
BODY = b"From: a@customer.test\r\nSubject: hello\r\nMessage-ID: <m1@customer.test>\r\n"


def message(extra: bytes = b"") -> bytes:
    return BODY + extra + b"\r\nline one\r\n.leading dot\r\n"


# --- fake neighbours ---------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple[str, int]
    helo: str
    tls: bool


@dataclass
class Behaviour:
    """Replies by recipient local part prefix: ``reject`` 550, ``later`` 451, ``greylist``
    451 on the first try only; ``data_delay`` seconds before answering DATA."""

    greylisted: set[str] = field(default_factory=set)
    data_delay: float = 0.0
    data_reply: str | None = None


class SinkHandler:
    def __init__(self, behaviour: Behaviour, pipelining: bool) -> None:
        self.behaviour = behaviour
        self.pipelining = pipelining
        self.received: list[Received] = []
        self.peers: set[tuple[str, int]] = set()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:  # aiosmtpd answers queued commands in order: PIPELINING works
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address.startswith("refused"):
            return "550 5.7.1 sender refused here"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("reject"):
            return f"550 5.1.1 <{address}>: no such user"
        if local.startswith("later"):
            return "451 4.3.0 try again later"
        if local.startswith("greylist") and address not in self.behaviour.greylisted:
            self.behaviour.greylisted.add(address)
            return "451 4.7.1 greylisted, come back later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.behaviour.data_delay:
            await asyncio.sleep(self.behaviour.data_delay)
        if self.behaviour.data_reply:
            return self.behaviour.data_reply
        self.peers.add(session.peer)
        self.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                session.peer,
                session.host_name,
                session.ssl is not None,
            )
        )
        return "250 2.0.0 Ok: queued"


class Sink:
    def __init__(
        self, ip: str, port: int, tls: ssl.SSLContext | None = None, pipelining: bool = True
    ) -> None:
        self.behaviour = Behaviour()
        self.handler = SinkHandler(self.behaviour, pipelining)
        kwargs: dict[str, Any] = {"tls_context": tls} if tls else {}
        self.controller = Controller(self.handler, hostname=ip, port=port, **kwargs)
        self.controller.start()

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def stop(self) -> None:
        self.controller.stop()


class FakeResolver:
    """MX and A answers from dicts; what counts as public is the real resolver's rule."""

    def __init__(self, rule: Resolver) -> None:
        self.mx: dict[str, MailHosts] = {}
        self.a: dict[str, list[str]] = {}
        self.asked: list[str] = []  # hosts whose addresses were looked up
        self._rule = rule

    def is_public(self, ip: str) -> bool:
        return self._rule.is_public(ip)

    def route(self, domain: str, *hosts: tuple[str, str]) -> None:
        """``route("far.test", ("mx1.far.test", "127.0.21.2"), ...)`` in preference order."""
        self.mx[domain] = MailHosts(
            domain, "ok", [MailHost(10 * (i + 1), h) for i, (h, _) in enumerate(hosts)]
        )
        for host, ip in hosts:
            self.a[host] = [ip]

    async def mail_hosts(self, domain: str) -> MailHosts:
        return self.mx.get(domain, MailHosts(domain, "nxdomain", rcode="NXDOMAIN"))

    async def addresses(self, host: str) -> DnsResult:
        self.asked.append(host)
        ips = self.a.get(host)
        if not ips:
            return DnsResult(host, "A+AAAA", "nxdomain", rcode="NXDOMAIN")
        records = [dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, ip) for ip in ips]
        return DnsResult(host, "A+AAAA", "ok", records, 300)


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met in time")


async def wait_gone(relay: Relay, queue_id: str, timeout: float = 10.0) -> None:
    """Until the message has left the spool (its attempt's result is committed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await relay.gone(queue_id):
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{queue_id} still queued")


# --- the relay under test -------------------------------------------------------------------


class Relay:
    def __init__(self, tmp_path: Path, port: int, **sections: dict[str, Any]) -> None:
        data: dict[str, Any] = {
            "gateway": {
                "hostname": HOSTNAME,
                "source_address": SOURCE,
                "spool": str(tmp_path / "spool"),
            },
            "spam": {"enabled": False},
            "mta_sts": {"enabled": False},
            # The far ends live on 127.0.21.x: public for this relay; 127.0.22.x stays internal.
            "dns": {"nameservers": ["127.0.0.1:1"], "extra_public_networks": [PUBLIC_NET]},
        }
        data["delivery"] = {
            "port": port,
            "retry_initial": "200ms",
            "retry_max": "1s",
            "scan_interval": "100ms",
            "connect_timeout": "2s",
            "command_timeout": "5s",
            **sections.pop("delivery", {}),
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        self.config: Config = parse_config(data)
        self.resolver = FakeResolver(Resolver(self.config.dns))
        self.spool: Spool
        self.delivery: Delivery

    async def start(self, tls_policy: bool = False) -> None:
        self.spool = await Spool.open(self.config.gateway.spool)
        policy = TlsPolicy(self.config, self.resolver) if tls_policy else None
        self.delivery = Delivery(self.config, self.spool, self.resolver, policy)
        await self.delivery.start()

    async def stop(self) -> None:
        await self.delivery.stop()
        await self.spool.close()

    async def send(self, sender: str, rcpts: list[str], data: bytes, **kw: Any) -> str:
        return await self.spool.enqueue(sender, rcpts, data, **kw)

    async def gone(self, queue_id: str) -> bool:
        return await self.spool.load(queue_id, with_data=False) is None


@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
async def far(request):
    """Two far ends (127.0.21.2 and .3) on a common port; .4 has nothing listening.  Each test
    runs against far ends with PIPELINING (commands in one write) and without (one by one)."""
    port = common_port("127.0.21.2", "127.0.21.3", "127.0.21.4")
    sinks = [Sink(ip, port, pipelining=request.param) for ip in ("127.0.21.2", "127.0.21.3")]
    yield port, sinks
    for sink in sinks:
        sink.stop()


@pytest.fixture
async def relay(tmp_path: Path, far):
    port, _ = far
    instance = Relay(tmp_path, port)
    instance.resolver.route("far.test", ("mx1.far.test", "127.0.21.2"))
    instance.resolver.route("customer.test", ("mx.customer.test", "127.0.21.3"))
    await instance.start()
    yield instance
    await instance.stop()


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


# --- tests -------------------------------------------------------------------------------------


async def test_delivers_from_source_address_with_ehlo_name(relay: Relay, far) -> None:
    _, (mx, _) = far
    queue_id = await relay.send("a@customer.test", ["b@far.test"], message())
    await wait_until(lambda: mx.received)
    got = mx.received[0]
    assert got.peer[0] == SOURCE and got.helo == HOSTNAME
    assert got.mail_from == "a@customer.test" and got.rcpt_tos == ["b@far.test"]
    assert b"\r\n.leading dot\r\n" in got.data  # dot-stuffing undone by the far end
    await wait_gone(relay, queue_id)
    sessions = [s for group in relay.delivery.pool._idle.values() for s in group]
    pipelining = mx.handler.pipelining
    assert sessions and all(s.connection.pipelining is pipelining for s in sessions)


async def test_sender_refused_bounces_every_recipient(relay: Relay, far) -> None:
    _, (mx, customer) = far
    queue_id = await relay.send("refused@customer.test", ["b@far.test", "c@far.test"], message())
    await wait_until(lambda: customer.received)  # the NDR, to the customer's own MX
    blocks = list(parse(customer.received[0].data).iter_parts())[1].get_payload()[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; b@far.test", "rfc822; c@far.test"]
    assert all("550 5.7.1 sender refused here" in b["Diagnostic-Code"] for b in blocks)
    await wait_gone(relay, queue_id)
    assert mx.received == []


async def test_reuses_connections_and_batches_recipients(relay: Relay, far) -> None:
    _, (mx, _) = far
    ids = [
        await relay.send("a@customer.test", ["b@far.test", "c@far.test"], message())
        for _ in range(30)
    ]
    await wait_until(lambda: len(mx.received) >= 30)
    assert all(r.rcpt_tos == ["b@far.test", "c@far.test"] for r in mx.received)
    connections = {r.peer for r in mx.received}
    assert len(connections) <= relay.config.delivery.max_connections_per_host
    assert relay.delivery.pool.reused >= 30 - len(connections)
    for queue_id in ids:
        await wait_gone(relay, queue_id)


async def test_verdict_header_removed_when_delivering_direct(relay: Relay, far) -> None:
    _, (mx, _) = far
    data = message(b"X-SMG-Verdict: spam score=12\r\n  folded part\r\n")
    await relay.send("a@customer.test", ["b@far.test"], data)
    await wait_until(lambda: mx.received)
    assert b"X-SMG-Verdict" not in mx.received[0].data
    assert b"folded part" not in mx.received[0].data
    assert b"Subject: hello" in mx.received[0].data


async def test_deferred_on_4xx_then_delivered_on_retry(relay: Relay, far) -> None:
    _, (mx, _) = far
    queue_id = await relay.send("a@customer.test", ["greylist1@far.test"], message())
    await wait_until(lambda: mx.received, timeout=5)
    assert mx.received[0].rcpt_tos == ["greylist1@far.test"]
    await wait_gone(relay, queue_id)
    assert relay.delivery.attempts >= 2


async def test_partial_success_per_recipient_and_ndr_for_5xx(relay: Relay, far) -> None:
    _, (mx, customer) = far
    rcpts = ["ok@far.test", "reject1@far.test", "later1@far.test"]
    queue_id = await relay.send("a@customer.test", rcpts, message())
    # The NDR goes back to the sender's own MX (customer.test -> 127.0.21.3).
    await wait_until(lambda: customer.received)
    ndr = customer.received[0]
    assert ndr.mail_from == "<>" and ndr.rcpt_tos == ["a@customer.test"]
    report = parse(ndr.data)
    assert report.get_content_type() == "multipart/report"
    blocks = list(report.iter_parts())[1].get_payload()[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; reject1@far.test"]
    assert blocks[0]["Status"] == "5.1.1"
    assert blocks[0]["Remote-MTA"] == "dns; mx1.far.test"
    assert "550 5.1.1 <reject1@far.test>: no such user" in blocks[0]["Diagnostic-Code"]
    assert mx.received[0].rcpt_tos == ["ok@far.test"]
    stored = await relay.spool.load(queue_id)
    assert [r.status for r in stored.recipients] == ["delivered", "bounced", "pending"]
    assert stored.state == "deferred" and "451" in stored.recipients[2].last_reply
    await asyncio.sleep(0.6)  # retries of the 451 recipient: still one NDR only
    assert len(customer.received) == 1


async def test_no_ndr_to_the_null_sender(relay: Relay, far) -> None:
    _, (_, customer) = far
    queue_id = await relay.send("", ["reject2@far.test"], message(), kind="ndr")
    await wait_gone(relay, queue_id)
    await asyncio.sleep(0.3)
    assert customer.received == []
    assert (await relay.spool.counts()) == {"active": 0, "deferred": 0, "held": 0}


async def test_null_mx_and_nxdomain_bounce_at_once(relay: Relay, far) -> None:
    _, (_, customer) = far
    relay.resolver.mx["null.test"] = MailHosts("null.test", "ok", null_mx=True)
    await relay.send("a@customer.test", ["x@null.test", "y@nowhere.test"], message())
    await wait_until(lambda: customer.received)
    blocks = list(parse(customer.received[0].data).iter_parts())[1].get_payload()[1:]
    assert [b["Status"] for b in blocks] == ["5.1.10", "5.1.2"]
    assert "null MX" in blocks[0]["Diagnostic-Code"]


async def test_dns_tempfail_defers(relay: Relay, far) -> None:
    relay.resolver.mx["flaky.test"] = MailHosts("flaky.test", "tempfail", rcode="SERVFAIL")
    queue_id = await relay.send("a@customer.test", ["x@flaky.test"], message())
    await asyncio.sleep(0.3)
    stored = await relay.spool.load(queue_id)
    assert stored.state in ("deferred", "active")
    assert "SERVFAIL" in (stored.recipients[0].last_reply or "")


async def test_next_mx_when_the_first_does_not_answer(relay: Relay, far) -> None:
    _, (_, second) = far
    relay.resolver.route(
        "multi.test", ("mx1.multi.test", "127.0.21.4"), ("mx2.multi.test", "127.0.21.3")
    )
    queue_id = await relay.send("a@customer.test", ["x@multi.test"], message())
    await wait_until(lambda: second.received)
    assert second.received[0].rcpt_tos == ["x@multi.test"]
    await wait_gone(relay, queue_id)


async def test_expired_message_gets_an_ndr(tmp_path: Path, far) -> None:
    port, (_, customer) = far
    relay = Relay(tmp_path, port, delivery={"max_lifetime": "1s"})
    relay.resolver.route("far.test", ("mx1.far.test", "127.0.21.2"))
    relay.resolver.route("customer.test", ("mx.customer.test", "127.0.21.3"))
    await relay.start()
    try:
        queue_id = await relay.send("a@customer.test", ["later9@far.test"], message())
        await wait_until(lambda: customer.received, timeout=8)
        blocks = list(parse(customer.received[0].data).iter_parts())[1].get_payload()[1:]
        assert blocks[0]["Action"] == "failed"
        assert blocks[0]["Status"].startswith("4.")
        assert "expired" in blocks[0]["Diagnostic-Code"]
        await wait_gone(relay, queue_id)
    finally:
        await relay.stop()


async def test_operator_hold_during_an_attempt_wins(relay: Relay, far) -> None:
    _, (mx, _) = far
    mx.behaviour.data_delay = 0.5
    mx.behaviour.data_reply = "451 4.3.0 busy"
    queue_id = await relay.send("a@customer.test", ["b@far.test"], message())
    await asyncio.sleep(0.2)  # the attempt is waiting for the DATA reply
    with SpoolAdmin(relay.spool.path) as admin:
        admin.hold(queue_id)
    await asyncio.sleep(0.8)
    stored = await relay.spool.load(queue_id)
    assert stored.state == "held" and stored.hold_reason == "operator"
    assert stored.attempts == 1
    mx.behaviour.data_delay, mx.behaviour.data_reply = 0.0, None
    await asyncio.sleep(0.4)
    assert mx.received == []  # held: not retried
    with SpoolAdmin(relay.spool.path) as admin:
        admin.release(queue_id)
    await wait_until(lambda: mx.received, timeout=3)


async def test_restart_resumes_active_messages(tmp_path: Path, far) -> None:
    port, (mx, _) = far
    spool = await Spool.open(tmp_path / "spool")
    queue_id = await spool.enqueue("a@customer.test", ["b@far.test"], message())
    await spool.close()  # "crashed" before any attempt: the row is still active
    relay = Relay(tmp_path, port)
    relay.resolver.route("far.test", ("mx1.far.test", "127.0.21.2"))
    await relay.start()
    try:
        await wait_until(lambda: mx.received)
        await wait_gone(relay, queue_id)
    finally:
        await relay.stop()


def test_data_block_line_ends_and_dots() -> None:
    assert data_block(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert data_block(b".x\nlone\rend") == b"..x\r\nlone\r\nend\r\n.\r\n"
    assert data_block(b"") == b"\r\n.\r\n"


def test_strip_header_keeps_everything_else() -> None:
    data = (
        b"Subject: a\r\nX-SMG-Verdict: spam\r\n\tfolded\r\nTo: b@x\r\n\r\n"
        b"X-SMG-Verdict: in the body stays\r\n"
    )
    assert strip_header(data, "X-SMG-Verdict") == (
        b"Subject: a\r\nTo: b@x\r\n\r\nX-SMG-Verdict: in the body stays\r\n"
    )
    assert strip_header(b"Subject: a\r\n\r\nbody", "X-Other") == b"Subject: a\r\n\r\nbody"
    assert strip_header(b"x-smg-verdict: ham\r\n\r\nb", "X-SMG-Verdict") == b"\r\nb"


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
async def tls_far(ca: TestCA):
    """.11: STARTTLS with a valid cert for mx1.secure.test; .12: wrong-name cert;
    .13: no STARTTLS; .14: valid cert for the bad gateway's address."""
    ips = ["127.0.21.11", "127.0.21.12", "127.0.21.13", "127.0.21.14"]
    port = common_port(*ips)
    sinks = {
        "valid": Sink(ips[0], port, ca.valid("mx1.secure.test").server_context()),
        "wrong": Sink(ips[1], port, ca.wrong_name().server_context()),
        "plain": Sink(ips[2], port),
        "bad_gateway": Sink(ips[3], port, ca.valid("127.0.21.14").server_context()),
    }
    yield port, sinks
    for sink in sinks.values():
        sink.stop()


async def tls_relay(tmp_path: Path, port: int, ca: TestCA, **extra: Any) -> Relay:
    rules = [
        {"sender": "*", "recipient": "hold.test", "level": "encrypt", "on_failure": "hold"},
        {"sender": "*", "recipient": "reject.test", "level": "encrypt", "on_failure": "reject"},
        {"sender": "*", "recipient": "verify.test", "level": "verify", "on_failure": "hold"},
    ]
    relay = Relay(
        tmp_path,
        port,
        tls_policy={"rules": rules, "ca_bundle": str(ca.ca_bundle), "hold_retry": "1h"},
        routing={
            "bad_gateways": [f"127.0.21.14:{port}"],
            "internal_ca": str(ca.ca_bundle),
        },
        **extra,
    )
    r = relay.resolver
    r.route("open.test", ("mx1.secure.test", "127.0.21.11"))
    r.route("hold.test", ("mx.plain.test", "127.0.21.13"))
    r.route("reject.test", ("mx.plain.test", "127.0.21.13"))
    r.route("verify.test", ("mx0.secure.test", "127.0.21.12"), ("mx1.secure.test", "127.0.21.11"))
    r.route("customer.test", ("mx.plain.test", "127.0.21.13"))
    await relay.start(tls_policy=True)
    return relay


async def test_opportunistic_starttls_when_offered(tmp_path: Path, tls_far, ca, caplog) -> None:
    port, sinks = tls_far
    relay = await tls_relay(tmp_path, port, ca)
    try:
        caplog.set_level("INFO", logger="smg.delivery")
        await relay.send("a@customer.test", ["b@open.test"], message())
        await wait_until(lambda: sinks["valid"].received)
        assert sinks["valid"].received[0].tls
        fmt = TextFormatter()
        await wait_until(lambda: any("status=sent" in fmt.format(r) for r in caplog.records))
        line = next(fmt.format(r) for r in caplog.records if "status=sent" in fmt.format(r))
        assert "relay=mx1.secure.test[127.0.21.11]" in line and "tls=TLSv1.3" in line
    finally:
        await relay.stop()


async def test_encrypt_without_starttls_is_held_never_cleartext(tmp_path, tls_far, ca) -> None:
    port, sinks = tls_far
    relay = await tls_relay(tmp_path, port, ca)
    try:
        queue_id = await relay.send("a@customer.test", ["b@hold.test"], message())
        await asyncio.sleep(0.5)
        stored = await relay.spool.load(queue_id)
        assert stored.state == "held" and stored.hold_reason == "tls"
        assert stored.next_attempt > time.time() + 3000  # tls_policy.hold_retry = 1h
        assert "no TLS connection could be established" in stored.recipients[0].last_reply
        assert sinks["plain"].received == []
        assert relay.delivery.tls_policy.failures.recent_failure("hold.test")
    finally:
        await relay.stop()


async def test_encrypt_with_reject_bounces_with_the_reason(tmp_path, tls_far, ca) -> None:
    port, sinks = tls_far
    relay = await tls_relay(tmp_path, port, ca)
    try:
        await relay.send("a@customer.test", ["b@reject.test"], message())
        # The NDR (cleartext is fine for it: customer.test has no rule) reaches the sender.
        await wait_until(lambda: sinks["plain"].received)
        got = sinks["plain"].received
        assert [r.rcpt_tos for r in got] == [["a@customer.test"]]
        report = parse(got[0].data)
        text = next(report.iter_parts()).get_content()
        assert "no TLS connection could be established" in text
        block = list(report.iter_parts())[1].get_payload()[1]
        assert block["Status"] == "5.7.10"
    finally:
        await relay.stop()


async def test_verify_skips_a_wrong_name_mx(tmp_path, tls_far, ca) -> None:
    port, sinks = tls_far
    relay = await tls_relay(tmp_path, port, ca)
    try:
        await relay.send("a@customer.test", ["b@verify.test"], message())
        await wait_until(lambda: sinks["valid"].received)
        assert sinks["valid"].received[0].tls
        assert sinks["wrong"].received == []
    finally:
        await relay.stop()


async def test_bad_gateway_route_uses_verified_tls_and_keeps_the_verdict(
    tmp_path, tls_far, ca
) -> None:
    port, sinks = tls_far
    relay = await tls_relay(tmp_path, port, ca)
    try:
        data = message(b"X-SMG-Verdict: spam\r\n")
        await relay.send("a@customer.test", ["b@open.test"], data, route="bad_gateway")
        await wait_until(lambda: sinks["bad_gateway"].received)
        got = sinks["bad_gateway"].received[0]
        assert got.tls and b"X-SMG-Verdict: spam" in got.data
        assert sinks["valid"].received == []  # not direct
    finally:
        await relay.stop()


async def test_bad_gateway_down_or_untrusted_stays_deferred_never_direct(
    tmp_path, tls_far, ca
) -> None:
    port, sinks = tls_far
    # First bad gateway: nothing listens; second: a certificate that does not name it.
    relay = await tls_relay(tmp_path, port, ca)
    relay.config = _with_bad_gateways(relay.config, [f"127.0.21.15:{port}", f"127.0.21.12:{port}"])
    relay.delivery.config = relay.config
    try:
        queue_id = await relay.send(
            "a@customer.test", ["b@open.test"], message(), route="bad_gateway"
        )
        await asyncio.sleep(0.6)
        stored = await relay.spool.load(queue_id)
        assert stored.state in ("deferred", "active") and stored.attempts >= 1
        assert all(not s.received for s in sinks.values())
    finally:
        await relay.stop()


def _with_bad_gateways(config: Config, gateways: list[str]) -> Config:
    import dataclasses

    routing = dataclasses.replace(
        config.routing, bad_gateways=[(g.split(":")[0], int(g.split(":")[1])) for g in gateways]
    )
    return dataclasses.replace(config, routing=routing)


async def test_a_backlog_drains_without_waiting_for_the_next_scan(tmp_path: Path, far) -> None:
    """After a restart with many messages due, delivery searches again as soon as its workers
    have room, not one batch per scan_interval."""
    port, (mx, _) = far
    spool = await Spool.open(tmp_path / "spool")
    for _ in range(120):
        await spool.enqueue("a@customer.test", ["b@far.test"], message())
    await spool.close()
    relay = Relay(tmp_path, port, delivery={"concurrency": 4, "scan_interval": "30s"})
    relay.resolver.route("far.test", ("mx1.far.test", "127.0.21.2"))
    await relay.start()
    try:
        # One batch per scan would be 8 messages per 30 s here.
        await wait_until(lambda: len(mx.received) >= 120, timeout=15)
    finally:
        await relay.stop()


class _SpoolReads:
    """Counts what the scheduler asks the spool: rows of due searches and claims."""

    def __init__(self, spool: Spool) -> None:
        self.rows = self.claims = 0
        due, claim = spool.due_by_destination, spool.begin_attempt

        async def counted_due(*args: Any, **kw: Any) -> Any:
            found = await due(*args, **kw)
            self.rows += len(found)
            return found

        async def counted_claim(queue_id: str) -> bool:
            self.claims += 1
            return await claim(queue_id)

        spool.due_by_destination = counted_due  # type: ignore[method-assign]
        spool.begin_attempt = counted_claim  # type: ignore[method-assign]


async def _full_destination_relay(tmp_path: Path, port: int) -> tuple[Relay, _SpoolReads]:
    """A relay whose destination far.test takes 2 attempts at a time (8 workers), polling
    only every 30 s, with its spool reads counted."""
    relay = Relay(tmp_path, port, delivery={"concurrency": 8, "destination_concurrency": 2,
                                            "scan_interval": "30s"})  # fmt: skip
    relay.resolver.route("far.test", ("mx1.far.test", "127.0.21.2"))
    await relay.start()
    return relay, _SpoolReads(relay.spool)


async def test_a_full_destination_is_fed_from_memory(tmp_path: Path, far) -> None:
    """A burst for one destination at its concurrency limit: the waiting messages are parked
    with their data, the poll does not read the destination's known messages again after
    every attempt, and nothing is claimed (they are this process's own)."""
    port, (mx, _) = far
    relay, reads = await _full_destination_relay(tmp_path, port)
    try:
        for _ in range(200):
            await relay.send("a@customer.test", ["b@far.test"], message())
        await wait_until(lambda: len(mx.received) >= 200, timeout=20)
    finally:
        await relay.stop()
    assert reads.claims == 0
    assert reads.rows <= 200, reads.rows  # before: the known ones again at every attempt's end


async def test_beyond_the_parked_limit_the_poll_takes_over_at_once(
    tmp_path: Path, far, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More waiting than may be parked: the rest stays in the spool and the poll finds it as
    soon as the parked ones are gone (not a scan_interval later), loading without a claim."""
    monkeypatch.setattr("gateway.delivery.scheduler.PARKED_MAX", 5)
    port, (mx, _) = far
    relay, reads = await _full_destination_relay(tmp_path, port)
    mx.behaviour.data_delay = 0.01  # slower than the burst arrives
    try:
        burst = [relay.send("a@customer.test", ["b@far.test"], message()) for _ in range(100)]
        await asyncio.gather(*burst)
        await wait_until(lambda: len(mx.received) >= 100, timeout=20)
    finally:
        await relay.stop()
    assert reads.claims == 0 and reads.rows > 0
    assert len({r.data for r in mx.received}) == 1 and len(mx.received) == 100


async def test_stop_ends_the_poll_even_when_woken_at_that_moment(tmp_path: Path, far) -> None:
    """A wake-up (an attempt's end) in the same moment as the stop must not make the poll
    swallow its cancellation and sleep on (asyncio.wait_for in Python 3.11 did: the service
    then hung at shutdown until systemd killed it)."""
    port, _ = far
    relay = Relay(tmp_path, port, delivery={"scan_interval": "30s"})
    await relay.start()
    try:
        await asyncio.sleep(0.1)  # the poll sleeps, waiting for a wake-up
        relay.delivery.wake()
        await asyncio.wait_for(relay.delivery.stop(), 5)
    finally:
        await relay.spool.close()


async def test_a_hand_off_held_before_its_turn_is_not_attempted(tmp_path: Path, far) -> None:
    """An operator's hold of a message still waiting in memory (however young) wins: the
    hold announces itself (gateway.queue.changes) and the hand-off is read again."""
    port, (mx, _) = far
    mx.behaviour.data_delay = 0.3
    relay = Relay(tmp_path, port, delivery={"destination_concurrency": 1})
    relay.resolver.route("far.test", ("mx1.far.test", "127.0.21.2"))
    await relay.start()
    try:
        ids = [await relay.send("a@customer.test", ["b@far.test"], message()) for _ in range(3)]
        with SpoolAdmin(relay.spool.path) as admin:
            admin.hold(ids[2])
        await wait_until(lambda: len(mx.received) >= 2, timeout=5)
        await asyncio.sleep(0.5)
        stored = await relay.spool.load(ids[2])
        assert len(mx.received) == 2 and stored.state == "held"
    finally:
        await relay.stop()
