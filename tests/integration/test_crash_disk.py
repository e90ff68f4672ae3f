"""A full disk under the spool: ``smg serve`` answers 4xx (never 250 then a loss), stays up,
and once there is room again delivers every message it acknowledged and takes new mail.

The spool lives on a tmpfs of 3 MiB mounted by the test (root only); the far end defers
everything at first, so the messages stay in the spool and fill it.
"""

from __future__ import annotations

import smtplib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import require_binaries, require_root
from tests.harness import KnotDNS, free_port, wait_for
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.integration

ZONE = "diskfull.test"
ZONE_TEXT = """
customer     MX 10 mx.customer
mx.customer  A 127.0.24.20
far          MX 10 mx.far
mx.far       A 127.0.24.20
"""
SENDER = f"big@customer.{ZONE}"
MAX_MESSAGES = 300  # bounded: the disk is full long before


class DeferringSink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.defer = True
        self.ids: list[str] = []

    async def handle_DATA(self, server, session, envelope):
        if self.defer:
            return "451 4.3.0 not now"
        head = envelope.original_content.split(b"\r\n\r\n", 1)[0]
        mid = next(
            (x.split(b":", 1)[1].strip().decode() for x in head.split(b"\r\n")
             if x.lower().startswith(b"message-id:")),
            "<none>",
        )  # fmt: skip
        with self.lock:
            self.ids.append(mid)
        return "250 2.0.0 Ok"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    require_root()
    mount_point = tmp_path / "spoolfs"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "smg-test-spool", str(mount_point)],
        check=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _message(n: int) -> bytes:
    body = ("x" * 76 + "\r\n") * 640  # about 50 KB
    return (
        f"From: {SENDER}\r\nTo: y@far.{ZONE}\r\nSubject: big {n}\r\n"
        f"Message-ID: <big-{n}@{ZONE}>\r\n\r\n{body}"
    ).encode()


def test_full_disk_gives_4xx_and_loses_nothing(knot_dns: KnotDNS, small_fs: Path) -> None:
    require_binaries("knotd")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    sink = DeferringSink()
    port = free_port("127.0.24.20")
    controller = Controller(sink, hostname="127.0.24.20", port=port)
    controller.start()
    config = base_config(small_fs.parent, knot_dns.nameserver, spool=str(small_fs / "spool"))
    config["delivery"] = {"port": port, "retry_initial": "1s", "retry_max": "1s",
                          "scan_interval": "200ms"}  # fmt: skip
    relay = SmgRelay(small_fs.parent, config)
    relay.start()
    acked: list[str] = []
    refusals: list[tuple[int, bytes]] = []
    try:
        host, smtp_port = relay.host_port
        with smtplib.SMTP(host, smtp_port, timeout=30) as client:
            for n in range(MAX_MESSAGES):
                try:
                    client.sendmail(SENDER, [f"y@far.{ZONE}"], _message(n))
                    acked.append(f"<big-{n}@{ZONE}>")
                except smtplib.SMTPDataError as exc:
                    refusals.append((exc.smtp_code, exc.smtp_error))
                    if len(refusals) >= 3:
                        break
        assert refusals, f"the 3 MiB spool took {len(acked)} messages of 50 KB?"
        assert all(400 <= code < 500 for code, _ in refusals), refusals
        assert len(acked) >= 5
        assert relay.proc is not None and relay.proc.poll() is None  # still up
        # Room again: grow the file system; the far end accepts from now on.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        sink.defer = False
        wait_for(lambda: set(acked) <= set(sink.ids), 60, interval=0.5,
                 what="every acknowledged message at the far end")  # fmt: skip
        with smtplib.SMTP(host, smtp_port, timeout=30) as client:
            client.sendmail(SENDER, [f"y@far.{ZONE}"], _message(9999))
        wait_for(lambda: "<big-9999@diskfull.test>" in sink.ids, 30, what="new mail delivered")
        wait_for(lambda: not relay.queued(), 30, interval=0.5, what="an empty queue")
        print(f"\nfull disk: {len(acked)} acknowledged, refusals {refusals[0]}")
    finally:
        relay.stop()
        controller.stop()
