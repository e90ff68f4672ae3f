"""The redundant blacklist monitor, leader with fallback (issue 13, point 3): the second
monitor host's unit waits the leader's head start and defers to it; ``smg blacklist check
--defer-to`` records without sending while the leader's relay answers, and notifies when it
does not; the leader's firewall lets the fallback ask."""

from __future__ import annotations

import asyncio
import socket
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.blacklist.fallback import LeaderNotifies, first_up
from roles import blacklist, firewall
from tests.harness import TestCA
from tests.unit.test_inventory import Site


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def test_the_second_monitor_defers_to_the_first(tmp_path: Path, ca: TestCA) -> None:
    site = Site(tmp_path, ca)
    site.all["blacklist_monitor_hosts"] = ["otc-de-mta01", "otc-de-mta02"]
    fleet = site.load()
    leader, fallback = fleet.get("otc-de-mta01"), fleet.get("otc-de-mta02")
    leader_unit = blacklist.units(leader, fleet)[blacklist.SERVICE]
    fallback_unit = blacklist.units(fallback, fleet)[blacklist.SERVICE]
    assert "--defer-to" not in leader_unit and "TimeoutStartSec=900s" in leader_unit
    assert "--defer-to [2001:db8:10::1]:25 --defer-wait 900" in fallback_unit
    assert "TimeoutStartSec=1800s" in fallback_unit
    # Both timers fire at the same time: the head start is the fallback's wait.
    assert (
        blacklist.units(leader, fleet)[blacklist.TIMER]
        == blacklist.units(fallback, fleet)[blacklist.TIMER]
    )
    rules = firewall.nftables_conf(fleet, leader)
    assert "2001:db8:10::2" in rules and "the other monitors" in rules


def test_first_up_finds_the_leader_that_answers() -> None:
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        up, down = listening.getsockname()[1], closed.getsockname()[1]
        assert asyncio.run(first_up([("127.0.0.1", down)], timeout=2)) is None
        assert (
            asyncio.run(first_up([("127.0.0.1", down), ("127.0.0.1", up)], timeout=2))
            == f"127.0.0.1:{up}"
        )


def test_with_the_leader_up_nothing_is_sent() -> None:
    notifier = LeaderNotifies("198.51.100.10:25", "id")
    message = EmailMessage()
    message["Subject"] = "LISTED: 198.51.100.13"
    asyncio.run(notifier.send_mail(message))
    reply = asyncio.run(notifier.post_json("https://tickets.example/api", {}, {}))
    assert notifier.skipped == ["LISTED: 198.51.100.13", "POST https://tickets.example/api"]
    assert reply["id"] == "(opened by 198.51.100.10:25)"
