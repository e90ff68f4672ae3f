"""Issue 12, internal targets (SSRF): delivery dials only public addresses, never an MX written
as an address literal, never the relay's own listener.

The relay under test is the one of test_delivery (fake resolver, real in-process far ends): its
``dns.extra_public_networks`` makes 127.0.21.0/24 public, so 127.0.22.x is "internal".  A
:class:`Tap` on an internal address counts the connections it is offered: it must see none.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.delivery.screen import LOOP, NOT_ROUTABLE, Screen, address_literal
from gateway.dns import MailHost, MailHosts
from tests.harness import common_port
from tests.unit.test_delivery import Relay, Sink, message, parse, wait_gone, wait_until

PUBLIC_FAR = "127.0.21.2"  # the far end of the public domain
CUSTOMER = "127.0.21.3"  # the sender's MX, where NDRs arrive
INTERNAL = "127.0.22.2"  # outside 127.0.21.0/24: not public for this relay


class Tap:
    """A TCP listener that only counts connections (and closes them at once)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, ip: str, port: int) -> None:
        self.server = await asyncio.start_server(self._accepted, ip, port)

    async def _accepted(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"554 5.3.2 a tap, not a mail server\r\n")
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def ends() -> AsyncIterator[tuple[int, Sink, Sink, Tap]]:
    port = common_port(PUBLIC_FAR, CUSTOMER, INTERNAL)
    far, customer = Sink(PUBLIC_FAR, port), Sink(CUSTOMER, port)
    tap = Tap()
    await tap.start(INTERNAL, port)
    yield port, far, customer, tap
    await tap.stop()
    far.stop()
    customer.stop()


async def started(tmp_path: Path, port: int, **sections: dict) -> Relay:
    relay = Relay(tmp_path, port, **sections)
    relay.resolver.route("customer.test", ("mx.customer.test", CUSTOMER))
    relay.resolver.route("far.test", ("mx.far.test", PUBLIC_FAR))
    await relay.start()
    return relay


def ndr_blocks(data: bytes) -> list:
    """The per-recipient blocks of an NDR's delivery-status part."""
    return list(parse(data).iter_parts())[1].get_payload()[1:]


async def test_an_mx_on_an_internal_address_bounces_and_is_never_dialled(
    tmp_path: Path, ends
) -> None:
    port, far, customer, tap = ends
    relay = await started(tmp_path, port)
    try:
        relay.resolver.route("internal.test", ("mx.internal.test", INTERNAL))
        # Two MX: the preferred one internal, the other public: only the public one is used.
        relay.resolver.route(
            "mixed.test", ("mx1.mixed.test", INTERNAL), ("mx2.mixed.test", PUBLIC_FAR)
        )
        rcpts = ["x@internal.test", "y@mixed.test"]
        queue_id = await relay.send("a@customer.test", rcpts, message())
        await wait_gone(relay, queue_id)
        await wait_until(lambda: customer.received)
        assert [r.rcpt_tos for r in far.received] == [["y@mixed.test"]]
        [block] = ndr_blocks(customer.received[0].data)
        assert block["Final-Recipient"] == "rfc822; x@internal.test"
        assert block["Status"] == NOT_ROUTABLE and block["Action"] == "failed"
        diagnostic = " ".join(block["Diagnostic-Code"].split())
        assert "mx.internal.test" in diagnostic and "not public" in diagnostic
        assert tap.connections == 0
    finally:
        await relay.stop()


@pytest.mark.parametrize("literal", [INTERNAL, PUBLIC_FAR, f"[{PUBLIC_FAR}]", "[IPv6:::1]"])
async def test_an_mx_written_as_an_address_is_not_a_host_name(
    tmp_path: Path, ends, literal: str
) -> None:
    """RFC 5321 5.1: the MX RDATA is a domain name.  Neither looked up nor dialled, even when
    the address would be public."""
    port, far, customer, tap = ends
    relay = await started(tmp_path, port)
    try:
        relay.resolver.mx["literal.test"] = MailHosts("literal.test", "ok", [MailHost(10, literal)])
        queue_id = await relay.send("a@customer.test", ["x@literal.test"], message())
        await wait_gone(relay, queue_id)
        await wait_until(lambda: customer.received)
        [block] = ndr_blocks(customer.received[0].data)
        assert block["Status"] == NOT_ROUTABLE
        assert "address literal" in " ".join(block["Diagnostic-Code"].split())
        assert far.received == [] and tap.connections == 0
        assert literal not in relay.resolver.asked
    finally:
        await relay.stop()


async def test_delivery_to_the_relays_own_listener_is_refused_as_a_loop(
    tmp_path: Path, ends
) -> None:
    """Even inside extra_public_networks: our own listen address and port is never dialled."""
    port, far, customer, _ = ends
    relay = await started(tmp_path, port, gateway={"listen": [f"{PUBLIC_FAR}:{port}"]})
    try:
        queue_id = await relay.send("a@customer.test", ["x@far.test"], message())
        await wait_gone(relay, queue_id)
        await wait_until(lambda: customer.received)
        [block] = ndr_blocks(customer.received[0].data)
        assert block["Status"] == LOOP
        assert "loops back to myself" in " ".join(block["Diagnostic-Code"].split())
        assert far.received == []
    finally:
        await relay.stop()


# --- the rules themselves -------------------------------------------------------------------


class Public:
    def is_public(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in ipaddress.ip_network("127.0.21.0/24")


@pytest.mark.parametrize(
    ("host", "literal"),
    [
        ("127.0.0.1", True),
        ("[127.0.0.1]", True),
        ("[IPv6:::1]", True),
        ("::1", True),
        ("10.1", True),  # inet_aton would take it: still no host name
        ("mx.example.net", False),
        ("127.0.0.1.example.net", False),  # a real (if odd) name: looked up as any other
        ("1mx.example.net", False),
    ],
)
def test_address_literal(host: str, literal: bool) -> None:
    assert address_literal(host) is literal


def test_screen_rules() -> None:
    screen = Screen(Public(), [("127.0.21.9", 2525), ("0.0.0.0", 25)])
    assert screen.refusal("d.test", "mx", "127.0.21.2", 2525, public_only=True) is None
    assert screen.refusal("d.test", "mx", "127.0.22.2", 2525, public_only=False) is None  # fleet
    internal = screen.refusal("d.test", "mx", "127.0.22.2", 2525, public_only=True)
    assert internal is not None and internal.enhanced == NOT_ROUTABLE
    for ip, port in [("127.0.21.9", 2525), ("::ffff:127.0.21.9", 2525), ("127.0.21.2", 25)]:
        loop = screen.refusal("d.test", "mx", ip, port, public_only=False)  # 0.0.0.0: local
        assert loop is not None and loop.enhanced == LOOP, (ip, port)
    not_ours = screen.refusal("d.test", "mx", "8.8.8.8", 25, public_only=False)
    assert not_ours is None  # port 25 of the wildcard listen, but not an address of this host
