"""The intake's policy rules (relay control, sender domain, recipient) and the path parser."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import pytest

from gateway.addresses import AddressError, parse_path, split_path
from gateway.config import parse_config
from gateway.dns import Resolver
from gateway.policy.chain import Action, MessageContext
from gateway.policy.rules.recipient import RecipientRule, recipient_problem
from gateway.policy.rules.relay_control import RelayControlRule, client_allowed
from gateway.policy.rules.sender_domain import SenderDomainRule, check_sender_domain
from tests.unit.fakedns import FakeZone, start_fake_dns

# --- path parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "path", "rest"),
    [
        ("<a@example.net>", "a@example.net", ""),
        ("<a@example.net> SIZE=100 BODY=8BITMIME", "a@example.net", "SIZE=100 BODY=8BITMIME"),
        ("<>", "", ""),
        (' <"a>b"@example.net>', '"a>b"@example.net', ""),
        ("a@example.net SIZE=1", "a@example.net", "SIZE=1"),
        ("<@r1,@r2:u@example.net>", "@r1,@r2:u@example.net", ""),
    ],
)
def test_split_path(arg: str, path: str, rest: str) -> None:
    assert split_path(arg) == (path, rest)


@pytest.mark.parametrize("arg", ["<a@example.net", "<a@example.net>SIZE=1", "", "a<b"])
def test_split_path_errors(arg: str) -> None:
    with pytest.raises(AddressError):
        split_path(arg)


def test_parse_path_parts() -> None:
    box = parse_path('"john doe"@Example.NET')
    assert (box.local, box.local_text, box.domain, box.quoted) == (
        '"john doe"',
        "john doe",
        "Example.NET",
        True,
    )
    routed = parse_path("@a.example,@b.example:u@c.example")
    assert routed.route == "@a.example,@b.example" and routed.address == "u@c.example"
    assert parse_path("u@[198.51.100.1]").is_address_literal
    assert parse_path("postmaster").domain == ""
    assert not parse_path("jörg@bücher.example").is_ascii


@pytest.mark.parametrize(
    "path",
    ["a..b@example.net", ".a@example.net", "a@", "@example.net", "a b@example.net",
     "a@exa mple.net", "a@-x.example", "x" * 65 + "@example.net", '"unterminated@x.net',
     "a@b@c.example", "@:u@example.net"],
)  # fmt: skip
def test_parse_path_errors(path: str) -> None:
    with pytest.raises(AddressError):
        parse_path(path)


# --- recipient rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reply"),
    [
        ("user@example.net", None),
        ('"john doe"@example.net', None),
        ("user+tag@sub.example.net", None),
        ("@relay.example:user@example.net", "550 5.7.1 Source routes"),
        ("user%victim.example@example.net", "550 5.7.1 '%'"),
        ("victim.example!user@example.net", "550 5.7.1 '!'"),
        ('"user@victim.example"@example.net', "550 5.7.1 A quoted local part"),
        ('"user%victim.example"@example.net', "550 5.7.1 A quoted local part"),
        ("user@[198.51.100.7]", "550 5.7.1 Address literals"),
        ("postmaster", "553 5.1.3 The recipient address must include a domain"),
        ("user@localhost", "553 5.1.3 The recipient domain localhost is not fully qualified"),
        ("a..b@example.net", "553 5.1.3 Bad recipient address syntax"),
        ("", "553 5.1.3 The null address"),
    ],
)
def test_recipient_problem(address: str, reply: str | None) -> None:
    problem = recipient_problem(address)
    if reply is None:
        assert problem is None
    else:
        assert problem is not None and str(problem).startswith(reply), str(problem)


async def test_recipient_rule_limit() -> None:
    rule = RecipientRule(max_recipients=2)
    ctx = MessageContext("127.0.0.1", rcpt_tos=["a@example.net", "b@example.net"])
    assert (await rule.evaluate(ctx)).action is None
    ctx.rcpt_tos.append("c@example.net")
    result = await rule.evaluate(ctx)
    assert result.action == Action.TEMPFAIL and str(result.reply).startswith("452 4.5.3")


# --- relay control --------------------------------------------------------------------------


async def test_relay_control() -> None:
    networks = [ipaddress.ip_network("127.0.0.0/29"), ipaddress.ip_network("2001:db8::/32")]
    assert client_allowed("127.0.0.7", networks)
    assert client_allowed("::ffff:127.0.0.1", networks)
    assert client_allowed("2001:db8::5", networks)
    assert not client_allowed("127.0.0.8", networks)
    assert not client_allowed("garbage", networks)
    rule = RelayControlRule(networks)
    refused = await rule.evaluate(MessageContext("127.0.0.9"))
    assert refused.action == Action.REJECT and str(refused.reply).startswith("554 5.7.1")
    assert (await rule.evaluate(MessageContext("127.0.0.2"))).action is None


# --- sender domain --------------------------------------------------------------------------


@pytest.fixture
async def resolver() -> AsyncIterator[Resolver]:
    zone = FakeZone()
    zone.add("mx-ok.test", "MX", "10 mx.mx-ok.test.")
    zone.add("mx.mx-ok.test", "A", "127.0.0.10")
    zone.add("a-only.test", "A", "127.0.0.11")
    zone.add("aaaa-only.test", "AAAA", "2a00:1450::1")
    zone.add("null-mx.test", "MX", "0 .")
    zone.add("null-mx.test", "A", "127.0.0.12")
    zone.add("private.test", "A", "10.1.2.3")
    zone.add("private-mx.test", "MX", "10 mx.private-mx.test.")
    zone.add("mx.private-mx.test", "A", "192.168.1.1")
    zone.add("mx-dangling.test", "MX", "10 nowhere.mx-dangling.test.")
    zone.add("mx-dangling-a.test", "MX", "10 nowhere.mx-dangling-a.test.")
    zone.add("mx-dangling-a.test", "A", "127.0.0.13")
    zone.add("mx-servfail.test", "MX", "10 mx.broken.test.")
    zone.add("txt-only.test", "TXT", '"hello"')
    zone.servfail.update({"servfail.test", "mx.broken.test"})
    zone.silent.add("timeout.test")
    transport, port = await start_fake_dns(zone)
    config = parse_config(
        {
            "gateway": {"hostname": "gw.example.net", "role": "bad"},
            "dns": {
                "nameservers": [f"127.0.0.1:{port}"],
                "extra_public_networks": ["127.0.0.0/8"],
                "timeout": "300ms",
            },
        }
    )
    yield Resolver(config.dns)
    transport.close()


@pytest.mark.parametrize(
    ("domain", "code"),
    [
        ("mx-ok.test", 0),
        ("a-only.test", 0),
        ("aaaa-only.test", 0),
        ("mx-dangling-a.test", 0),  # the domain's own public A still counts
        ("nxdomain.test", 1),
        ("null-mx.test", 1),  # null MX wins over the A record
        ("private.test", 1),
        ("private-mx.test", 1),
        ("mx-dangling.test", 1),
        ("txt-only.test", 1),
        ("servfail.test", 2),
        ("timeout.test", 2),
        ("mx-servfail.test", 2),  # the MX host's lookup failed: not sure, so 451
    ],
)
async def test_check_sender_domain(resolver: Resolver, domain: str, code: int) -> None:
    verdict = await check_sender_domain(resolver, domain)
    assert verdict.exit_code == code, verdict
    if code == 1:
        assert str(verdict.reply).startswith("550 5.1.8 Sender Domain must resolve")
    if code == 2:
        assert str(verdict.reply).startswith("451 4.4.3")


@pytest.mark.parametrize(
    ("mail_from", "reply"),
    [
        ("", None),
        ("someone@mx-ok.test", None),
        ("someone@nxdomain.test", "550 5.1.8 Sender Domain must resolve"),
        ("someone@[127.0.0.1]", "550 5.1.8 Sender Domain must resolve"),
        ("someone", "553 5.1.7 The sender address must include a domain"),
        ("@x.test:someone@mx-ok.test", "553 5.1.7 Source routes"),
        ("a..b@mx-ok.test", "553 5.1.7 Bad sender address syntax"),
        ("someone@timeout.test", "451 4.4.3"),
    ],
)
async def test_sender_domain_rule(resolver: Resolver, mail_from: str, reply: str | None) -> None:
    ctx = MessageContext("127.0.0.1", mail_from=mail_from)
    result = await SenderDomainRule(resolver).evaluate(ctx)
    if reply is None:
        assert result.action is None, result
    else:
        assert str(result.reply).startswith(reply), result


async def test_sender_verdict_reused_within_ttl_but_never_a_tempfail(resolver: Resolver) -> None:
    now = [100.0]
    rule = SenderDomainRule(resolver, clock=lambda: now[0])
    calls: list[str] = []
    real_addresses = resolver.addresses

    async def counting(name: str):  # type: ignore[no-untyped-def]
        calls.append(name)
        return await real_addresses(name)

    resolver.addresses = counting  # type: ignore[method-assign]
    for _ in range(3):
        ctx = MessageContext("127.0.0.1", mail_from="someone@mx-ok.test")
        assert (await rule.evaluate(ctx)).action is None
        assert ctx.facts["sender_domain"]["host"] == "mx.mx-ok.test"
    assert calls == ["mx.mx-ok.test"]  # one check, reused
    now[0] += 5.1  # past VERDICT_SECONDS (TTL 300): checked again
    assert (
        await rule.evaluate(MessageContext("127.0.0.1", mail_from="a@MX-OK.test"))
    ).action is None
    assert calls == ["mx.mx-ok.test"] * 2
    for _ in range(2):  # a 550 is reused as well, a 451 never
        result = await rule.evaluate(MessageContext("127.0.0.1", mail_from="a@nxdomain.test"))
        assert str(result.reply).startswith("550 5.1.8")
    for _ in range(2):
        result = await rule.evaluate(MessageContext("127.0.0.1", mail_from="a@mx-servfail.test"))
        assert str(result.reply).startswith("451 4.4.3")
    assert calls.count("mx.broken.test") == 2
