"""Bad input against a good gateway's intake, from the customer host: each attempt gets the
expected reply, nothing is queued from it, and the gateway keeps serving (the relay is not
restarted, and a normal message afterwards is accepted and delivered).

The raw client (bench.fleet.smtp.RawSmtp) sends exactly the bytes written here: swaks would
correct line endings and long lines.
"""

from __future__ import annotations

import threading
import time
import tomllib
from collections.abc import Iterator

import pytest

from bench.fleet import mail
from bench.fleet.smtp import CRLF, RawSmtp, dot_stuff
from tests.acceptance.lab_fleet import Fleet, Gateway, record, wait_for

pytestmark = pytest.mark.lab

SENDER = "alice@customer-a.example"
DOMAIN = "partner-plain.example"
GATEWAY = "otc-de-mta01"
FLOOD_GATEWAY = "otc-de-mta02"


@pytest.fixture(scope="module")
def target(fleet: Fleet) -> Iterator[Gateway]:
    """otc-de-mta01, checked after the whole module: same relay process, still serving."""
    gateway = fleet.gateways[GATEWAY]
    pid, restarts = gateway.main_pid(), gateway.restarts()
    yield gateway
    assert gateway.main_pid() == pid and gateway.restarts() == restarts, "the relay restarted"
    assert_still_serving(fleet, gateway)


def assert_still_serving(fleet: Fleet, gateway: Gateway) -> None:
    tag = mail.new_tag("still-serving")
    sent = fleet.send(gateway, "ham", tag, SENDER, f"{tag}@{DOMAIN}")
    assert sent.accepted, sent.transcript
    (copy,) = fleet.arrived(tag)
    assert copy.client_address == gateway.address


def begin(client: RawSmtp, rcpt: str) -> None:
    assert client.cmd("EHLO mail.customer-a.example").code == 250
    assert client.cmd(f"MAIL FROM:<{SENDER}>").code == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert client.cmd("DATA").code == 354


def nothing_arrives(fleet: Fleet, *tags: str, grace: float = 2.0) -> None:
    time.sleep(grace)
    arrived = [t for t in tags if fleet.mailboxes.tagged(t)]
    assert not arrived, f"refused input was delivered: {arrived}"


# --- SMTP smuggling -------------------------------------------------------------------------

SMUGGLING = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "LF.CR": b"\n.\r",
    "CR.CR": b"\r.\r",
}


@pytest.mark.parametrize("trick", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_smuggling_is_refused_and_nothing_slips_in(fleet: Fleet, target: Gateway, trick: bytes):
    carrier, smuggled = mail.new_tag("carrier"), mail.new_tag("smuggled")
    with fleet.raw(target) as client:
        begin(client, f"{carrier}@{DOMAIN}")
        client.send(
            f"Message-ID: <{carrier}@customer-a.example>\r\n\r\ncarrier".encode()
            + trick
            + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{smuggled}@{DOMAIN}>\r\nDATA\r\n".encode()
            + f"Message-ID: <{smuggled}@customer-a.example>\r\n\r\nsmuggled\r\n.\r\n".encode()
        )
        reply = client.reply()
        assert reply.code == 550 and "5.6.11" in reply.text, reply
        assert client.cmd("NOOP").code == 250, "exactly one reply: nothing else was parsed"
    nothing_arrives(fleet, carrier, smuggled)


# --- sizes and lines ------------------------------------------------------------------------


def announced_size(fleet: Fleet, gateway: Gateway) -> int:
    with fleet.raw(gateway) as client:
        ehlo = client.cmd("EHLO mail.customer-a.example").text
    sizes = [line.split()[-1] for line in ehlo.splitlines() if line[4:].startswith("SIZE")]
    assert sizes, ehlo
    return int(sizes[0])


def test_oversize_declared_and_real(fleet: Fleet, target: Gateway) -> None:
    limit = announced_size(fleet, target)
    with fleet.raw(target) as client:
        client.cmd("EHLO mail.customer-a.example")
        reply = client.cmd(f"MAIL FROM:<{SENDER}> SIZE={limit + 1}")
        assert reply.code == 552 and "5.3.4" in reply.text, reply
    tag = mail.new_tag("oversize")
    line = b"x" * 76 + CRLF
    body = mail.ham(tag, SENDER, f"{tag}@{DOMAIN}") + line * (limit // len(line) + 10)
    with fleet.raw(target, timeout=120) as client:
        begin(client, f"{tag}@{DOMAIN}")  # no SIZE= given: the gateway finds out by itself
        client.send(dot_stuff(body))
        reply = client.reply()
        assert reply.code == 552 and "5.3.4" in reply.text, reply
        assert client.cmd("NOOP").code == 250
    nothing_arrives(fleet, tag)


def test_over_long_lines(fleet: Fleet, target: Gateway) -> None:
    tag = mail.new_tag("longline")
    with fleet.raw(target) as client:
        begin(client, f"{tag}@{DOMAIN}")
        data = f"Message-ID: <{tag}@customer-a.example>\r\n\r\n".encode() + b"y" * 1200 + CRLF
        client.send(data + b"." + CRLF)
        reply = client.reply()
        assert reply.code == 550 and "5.6.0" in reply.text, reply
        reply = client.cmd("NOOP " + "z" * 2000)
        assert reply.code == 500 and "5.5.2" in reply.text, reply
        assert client.cmd("NOOP").code == 250
    nothing_arrives(fleet, tag)


# --- addresses and relay tricks -------------------------------------------------------------

BAD_ADDRESSES = {
    "MAIL FROM:<alice@customer-a.example": 501,
    "MAIL FROM:alice": 553,  # no domain
    "MAIL FROM:<jörg@customer-a.example>": 553,  # non-ASCII without SMTPUTF8
}
BAD_RECIPIENTS = {
    "no-domain": ("<bob>", 553),
    "null": ("<>", 553),
    "single-label": ("<bob@localhost>", 553),
    "source-route": (f"<@hop.example:bob@{DOMAIN}>", 550),
    "percent-hack": (f"<bob%victim.example@{DOMAIN}>", 550),
    "bang-path": (f"<victim.example!bob@{DOMAIN}>", 550),
    "quoted-at": (f'<"bob@victim.example"@{DOMAIN}>', 550),
    "address-literal": ("<bob@[198.51.100.21]>", 550),
}


@pytest.mark.parametrize("command", list(BAD_ADDRESSES), ids=["unclosed", "no-domain", "utf8"])
def test_bad_sender_address(fleet: Fleet, target: Gateway, command: str) -> None:
    with fleet.raw(target) as client:
        client.cmd("EHLO mail.customer-a.example")
        reply = client.cmd(command)
        assert reply.code == BAD_ADDRESSES[command], reply
        assert client.cmd(f"MAIL FROM:<{SENDER}>").code == 250  # the session goes on


@pytest.mark.parametrize("case", list(BAD_RECIPIENTS))
def test_bad_recipient_and_relay_tricks(fleet: Fleet, target: Gateway, case: str) -> None:
    path, code = BAD_RECIPIENTS[case]
    with fleet.raw(target) as client:
        client.cmd("EHLO mail.customer-a.example")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        reply = client.cmd(f"RCPT TO:{path}")
        assert reply.code == code, reply
        assert client.cmd("DATA").code == 503, "no valid recipient: no DATA"


def test_mail_loop_is_refused(fleet: Fleet, target: Gateway) -> None:
    tag = mail.new_tag("loop")
    hops = "".join(f"Received: from hop{i}.example by hop{i + 1}.example\r\n" for i in range(55))
    data = hops.encode() + mail.ham(tag, SENDER, f"{tag}@{DOMAIN}")
    with fleet.raw(target) as client:
        client.cmd("EHLO mail.customer-a.example")
        reply = client.transaction(SENDER, [f"{tag}@{DOMAIN}"], data)
        assert reply.code == 554 and "5.4.6" in reply.text, reply
    nothing_arrives(fleet, tag)


# --- slow clients and a flood -----------------------------------------------------------------


def test_slow_clients_do_not_block_others(fleet: Fleet, target: Gateway) -> None:
    """20 silent sessions and one client trickling its message line by line: a normal client
    is served at once meanwhile, and the trickled message is accepted in the end."""
    silent = [fleet.raw(target) for _ in range(20)]
    slow_tag, quick_tag = mail.new_tag("slow"), mail.new_tag("quick")
    replies: dict[str, str] = {}

    def trickle() -> None:
        with fleet.raw(target, timeout=60) as client:
            begin(client, f"{slow_tag}@{DOMAIN}")
            for line in dot_stuff(mail.ham(slow_tag, SENDER, f"{slow_tag}@{DOMAIN}")).split(CRLF):
                if line:
                    client.send(line + CRLF)
                    time.sleep(0.25)
            replies["slow"] = str(client.reply())

    slow = threading.Thread(target=trickle, daemon=True)
    try:
        assert all(c.banner.code == 220 for c in silent)
        slow.start()
        time.sleep(1)
        started = time.monotonic()
        quick = fleet.send(target, "ham", quick_tag, SENDER, f"{quick_tag}@{DOMAIN}")
        quick_seconds = time.monotonic() - started
        assert quick.accepted, quick.transcript
        assert slow.is_alive(), "the slow client should still be trickling"
        assert quick_seconds < 5, f"a normal client waited {quick_seconds:.1f} s"
        record(
            "slow clients",
            f"20 silent sessions + 1 trickling at 4 lines/s: a normal message took "
            f"{quick_seconds:.2f} s (swaks, connect to 250)",
        )
        slow.join(60)
    finally:
        for client in silent:
            client.close()
    assert replies.get("slow", "").startswith("250"), replies
    fleet.arrived(slow_tag)
    fleet.arrived(quick_tag)


def test_connection_flood_is_bounded_and_the_gateway_recovers(fleet: Fleet) -> None:
    """More sessions than ``gateway.max_connections`` at once: the extra ones get
    ``421 4.7.0`` and are closed; when the flood ends, the gateway serves at once."""
    gateway = fleet.gateways[FLOOD_GATEWAY]
    pid = gateway.main_pid()
    limit = max_connections(gateway)
    flood: list[RawSmtp] = []
    greeted = refused = 0
    try:
        for _ in range(limit + 25):  # bounded
            client = fleet.raw(gateway, timeout=10)
            flood.append(client)
            if client.banner.code == 220:
                greeted += 1
            elif client.banner.code == 421:
                refused += 1
                client.close()
    finally:
        for client in flood:
            client.close()
    assert greeted <= limit and refused >= 25, (greeted, refused)
    closed = time.monotonic()
    wait_for("a free slot", lambda: gateway.smtp_ready(fleet.netns), 20, 0.1)
    record(
        "connection flood",
        f"{limit + 25} sessions at once to {gateway.name}: {greeted} greeted (limit {limit}), "
        f"{refused} got 421 4.7.0; 220 again {time.monotonic() - closed:.2f} s after they closed",
    )
    assert_still_serving(fleet, gateway)
    assert gateway.main_pid() == pid


def max_connections(gateway: Gateway) -> int:
    config = tomllib.loads(gateway.check("cat /etc/smg/smg.toml"))
    return int(config["gateway"].get("max_connections", 200))
