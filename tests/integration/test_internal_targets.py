"""Issue 12, internal targets (SSRF), with the real ``smg serve``, knot DNS and a Postfix far
end: an MX on an internal address, an MX written as an address, and an MX on the relay's own
listener are never dialled; the sender gets an NDR that says why.

``dns.extra_public_networks = 127.0.23.0/24``: those addresses stand for the internet;
127.200.0.5 (outside it) stands for an internal host.  Everything shares one port, as port 25
does on the internet, and the relay listens on that port too (127.0.23.5).

- 127.0.23.10 ``mx.customer.int.test``: the sender's MX (Postfix), where NDRs arrive;
- 127.200.0.5 ``mx.internal.int.test``: a :class:`Tap` that counts connections: must see none;
- ``literal.int.test``: ``MX 10 127.0.23.10.`` (an address where a host name belongs);
- ``loop.int.test``: its MX is the relay's own listen address.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, common_port, wait_for
from tests.harness.postfix import PostfixFarEnd, ReceivedMessage
from tests.harness.swaks import swaks
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.integration

ZONE = "int.test"
LISTEN = "127.0.23.5"
CUSTOMER = "127.0.23.10"
INTERNAL = "127.200.0.5"
ZONE_TEXT = f"""
customer        MX 10 mx.customer
mx.customer     A {CUSTOMER}
internal        MX 10 mx.internal
mx.internal     A {INTERNAL}
literal         MX 10 {CUSTOMER}.
loop            MX 10 mx.loop
mx.loop         A {LISTEN}
"""
SENDER = f"alice@customer.{ZONE}"


class Tap:
    """A TCP listener in a thread that counts the connections it is offered."""

    def __init__(self, address: str, port: int) -> None:
        self.connections = 0
        self._sock = socket.create_server((address, port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self._sock.accept()
                self.connections += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture(scope="module")
def port() -> int:
    return common_port(LISTEN, CUSTOMER, INTERNAL)


@pytest.fixture(scope="module")
def tap(port: int) -> Iterator[Tap]:
    listener = Tap(INTERNAL, port)
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def customer(port: int) -> Iterator[PostfixFarEnd]:
    require_binaries("postfix")
    daemon = PostfixFarEnd(address=CUSTOMER, port=port, hostname=f"mx.customer.{ZONE}", tls="none")
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture(scope="module")
def relay(
    knot_dns: KnotDNS, port: int, customer, tap, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SmgRelay]:
    require_binaries("swaks")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    tmp: Path = tmp_path_factory.mktemp("internal")
    config = base_config(tmp, knot_dns.nameserver, client_networks=["127.0.0.0/8"])
    config["gateway"]["listen"] = [f"{LISTEN}:{port}"]
    config["dns"]["extra_public_networks"] = ["127.0.23.0/24"]
    config["delivery"] = {"port": port, "retry_initial": "1s", "scan_interval": "200ms",
                          "connect_timeout": "2s"}  # fmt: skip
    relay = SmgRelay(tmp, config)
    relay.start()
    yield relay
    relay.stop()


def bounce_for(relay: SmgRelay, customer: PostfixFarEnd, rcpt: str) -> ReceivedMessage:
    """Send to ``rcpt``; return the NDR the sender's MX got for it."""
    result = swaks(
        relay.endpoint, to=[rcpt], mail_from=SENDER, data=f"Subject: to {rcpt}\r\n\r\nhi\r\n"
    )
    assert result.ok, result.transcript

    def ndr() -> ReceivedMessage | None:
        for message in customer.received():
            if rcpt.encode() in message.raw and message.mail_from == "":
                return message
        return None

    found = wait_for(ndr, 20, what=f"the NDR for {rcpt}")
    wait_for(lambda: not relay.queued(), 10, what="an empty queue")
    return found


def flat(message: ReceivedMessage) -> str:
    return " ".join(message.raw.decode(errors="replace").split())


def test_an_mx_on_an_internal_address_bounces_and_nothing_connects_there(
    relay, customer, tap
) -> None:
    ndr = bounce_for(relay, customer, f"bob@internal.{ZONE}")
    text = flat(ndr)
    assert "Status: 5.4.4" in text
    assert f"mx.internal.{ZONE}" in text and "not public" in text
    assert tap.connections == 0


def test_an_mx_written_as_an_address_is_not_dialled(relay, customer) -> None:
    before = customer.log_text().count("connect from")
    ndr = bounce_for(relay, customer, f"bob@literal.{ZONE}")
    assert "Status: 5.4.4" in flat(ndr) and "address literal" in flat(ndr)
    # The NDR itself is the only delivery to the customer's MX: the literal was not dialled.
    assert not [m for m in customer.received() if m.rcpt_tos == (f"bob@literal.{ZONE}",)]
    assert customer.log_text().count("connect from") - before <= 1


def sessions(relay: SmgRelay) -> int:
    """SMTP sessions the relay's intake has had (its ``connect`` events)."""
    return sum(" connect " in f" {line} " for line in relay.log_path.read_text().splitlines())


def test_delivery_to_the_relays_own_listener_is_refused_as_a_loop(relay, customer) -> None:
    before = sessions(relay)
    ndr = bounce_for(relay, customer, f"bob@loop.{ZONE}")
    assert "Status: 5.4.6" in flat(ndr) and "loops back to myself" in flat(ndr)
    assert sessions(relay) - before == 1, relay.log()  # swaks only: the relay never came back
