"""Per-destination shaping on the real ``smg serve`` with real far ends (aiosmtpd sinks, knot
DNS serving the MX records):

- 127.0.25.11 ``mx.slow.shp.test`` answers every DATA with ``421 4.7.0 Too many messages``;
- 127.0.25.12 ``mx.live.shp.test`` takes everything;
- 127.0.25.13 ``mx.dead.shp.test``: nothing listens (connection refused).

The throttled and the dead destinations are paused (concurrency lowered, no attempts during the
pause) while mail to the healthy one is delivered at once; when the pause ends (the dead-host
cache expires) a probe goes, and once the far end takes mail again the backlog drains.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, common_port, wait_for
from tests.harness.sink import SmtpSink
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.integration

ZONE = "shp.test"
ZONE_TEXT = """
customer  MX 10 mx.live
slow      MX 10 mx.slow
mx.slow   A 127.0.25.11
live      MX 10 mx.live
mx.live   A 127.0.25.12
dead      MX 10 mx.dead
mx.dead   A 127.0.25.13
"""
THROTTLE = "421 4.7.0 Too many messages, slow down"
PAUSE = 3.0


@pytest.fixture(scope="module")
def port() -> int:
    return common_port("127.0.25.11", "127.0.25.12", "127.0.25.13")


@pytest.fixture
def far_ends(port: int) -> Iterator[tuple[SmtpSink, SmtpSink]]:
    slow = SmtpSink("127.0.25.11", port, data_reply=THROTTLE, hostname=f"mx.slow.{ZONE}")
    live = SmtpSink("127.0.25.12", port, hostname=f"mx.live.{ZONE}")
    slow.start()
    live.start()
    yield slow, live
    slow.stop()
    live.stop()


@pytest.fixture
def relay(knot_dns: KnotDNS, port: int, far_ends, tmp_path) -> Iterator[SmgRelay]:
    require_binaries("knotd")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    config = base_config(tmp_path, knot_dns.nameserver, source_address="127.0.25.5")
    config["delivery"] = {
        "port": port,
        "retry_initial": "1s",
        "retry_max": "1s",
        "scan_interval": "200ms",
        "connect_timeout": "2s",
        "connection_reuse": "0s",
        "destination_concurrency": 4,
        "throttle_pause": f"{PAUSE:g}s",
        "throttle_pause_max": f"{2 * PAUSE:g}s",
    }
    relay = SmgRelay(tmp_path, config)
    relay.start()
    yield relay
    relay.stop()


def send(relay: SmgRelay, to: str, n: int) -> None:
    """``n`` messages to ``to`` over one SMTP session (smtplib: the test's own client)."""
    import smtplib

    host, port = relay.host_port
    with smtplib.SMTP(host, port, timeout=20) as client:
        for i in range(n):
            client.sendmail(f"a@customer.{ZONE}", [to], f"Subject: {to} {i}\r\n\r\nhi\r\n")


def pauses(relay: SmgRelay, destination: str) -> list[str]:
    return [line for line in relay.log_path.read_text().splitlines()
            if "destination_paused" in line and f"destination={destination}" in line]  # fmt: skip


def test_a_throttled_destination_is_paused_while_others_are_delivered(relay, far_ends) -> None:
    slow, live = far_ends
    send(relay, f"x@slow.{ZONE}", 12)
    send(relay, f"x@dead.{ZONE}", 6)
    started = time.monotonic()
    send(relay, f"x@live.{ZONE}", 20)
    wait_for(lambda: len(live.messages) >= 20, 15, what="20 messages at the healthy far end")
    healthy = time.monotonic() - started
    wait_for(lambda: pauses(relay, f"slow.{ZONE}") and pauses(relay, f"dead.{ZONE}"), 10,
             what="both pauses in the log")  # fmt: skip
    first = pauses(relay, f"slow.{ZONE}")[0]
    assert THROTTLE in first and "concurrency=2" in first, first
    # 12 queued, retried every second, but paused: only the first wave (at most the
    # destination's concurrency of 4) reached the far end before the pause.
    time.sleep(PAUSE * 0.6)
    assert len(slow.messages) <= 4, len(slow.messages)
    assert healthy < 10, healthy
    # The mail waits in the queue, listed by destination.
    command = [sys.executable, "-m", "gateway.cli", "queue", "list", "--config",
               str(relay.config_path), "--destination", f"SLOW.{ZONE}"]  # fmt: skip
    listed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert len(re.findall(rf"x@slow\.{ZONE}", listed.stdout)) == 12


def test_the_pause_expires_probes_and_the_backlog_drains(relay, far_ends) -> None:
    slow, _live = far_ends
    send(relay, f"x@slow.{ZONE}", 10)
    wait_for(lambda: pauses(relay, f"slow.{ZONE}"), 10, what="the first pause")
    paused_at = time.monotonic()
    seen = len(slow.messages)
    # The pause ends: one probe (concurrency halved), answered 421 again: a longer pause.
    wait_for(lambda: len(pauses(relay, f"slow.{ZONE}")) >= 2, PAUSE + 8, what="a second pause")
    assert time.monotonic() - paused_at >= PAUSE * 0.9
    second = pauses(relay, f"slow.{ZONE}")[1]
    assert f"seconds={2 * PAUSE:g}" in second, second
    assert len(slow.messages) - seen <= 2
    # The far end recovers: after the pause the probe succeeds and everything drains.
    slow.data_reply = "250 2.0.0 OK queued"
    wait_for(lambda: not relay.queued(), 2 * PAUSE + 20, what="the backlog drained")
    assert f"destination_resumed destination=slow.{ZONE}" in relay.log_path.read_text()


def test_a_flush_ends_the_pause_in_the_running_relay(knot_dns, port, far_ends, tmp_path) -> None:
    """A long pause (2 minutes) and the far end back: ``smg queue flush --destination`` ends
    the pause of the running relay (as postqueue -f unthrottles Postfix), the mail goes now."""
    slow, _live = far_ends
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    config = base_config(tmp_path, knot_dns.nameserver, source_address="127.0.25.5")
    config["delivery"] = {"port": port, "retry_initial": "1s", "retry_max": "1s",
                          "scan_interval": "200ms", "connection_reuse": "0s",
                          "throttle_pause": "120s", "throttle_pause_max": "240s"}  # fmt: skip
    relay = SmgRelay(tmp_path, config)
    relay.start()
    try:
        send(relay, f"x@slow.{ZONE}", 3)
        wait_for(lambda: pauses(relay, f"slow.{ZONE}"), 10, what="the pause")
        slow.data_reply = "250 2.0.0 OK queued"
        command = [sys.executable, "-m", "gateway.cli", "queue", "flush", "--config",
                   str(relay.config_path), "--destination", f"slow.{ZONE}"]  # fmt: skip
        flushed = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert flushed.returncode == 0, flushed.stderr
        assert "pause ended" in flushed.stdout, flushed.stdout
        wait_for(lambda: not relay.queued(), 20, what="the backlog drained after the flush")
        log = relay.log_path.read_text()
        assert f"destination_unpaused destination=slow.{ZONE} by=flush" in log
    finally:
        relay.stop()
