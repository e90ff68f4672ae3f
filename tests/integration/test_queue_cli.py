"""``smg queue`` on a live ``smg serve``: list (text and JSON), show, flush, hold, release,
delete, and clear errors for unknown ids.

The relay retries only after an hour (``retry_initial = 1h``), so every attempt seen here after
the first was caused by the operator's command.  MX of ``down.qcli.test`` is 127.0.23.11, where
a Postfix far end is started only when the test wants the message to go through.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.queue.admin import SpoolAdmin
from tests.conftest import require_binaries
from tests.harness import KnotDNS, free_port, wait_for
from tests.harness.postfix import PostfixFarEnd
from tests.harness.swaks import swaks
from tests.integration.smg_relay import SMG, SmgRelay, base_config, queued_as

pytestmark = pytest.mark.integration

ZONE = "qcli.test"
ZONE_TEXT = """
customer     MX 10 mx.customer
mx.customer  A 127.0.23.10
down         MX 10 mx.down
mx.down      A 127.0.23.11
"""
SENDER = f"alice@customer.{ZONE}"


@pytest.fixture(scope="module")
def relay(knot_dns: KnotDNS, tmp_path_factory) -> Iterator[SmgRelay]:
    require_binaries("swaks", "postfix")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    tmp = tmp_path_factory.mktemp("queue-cli")
    config = base_config(tmp, knot_dns.nameserver, source_address="127.0.23.5")
    config["delivery"] = {
        "port": free_port("127.0.23.11"),
        "retry_initial": "1h",
        "throttle_pause": "1s",  # a down MX pauses its domain; flush must find it soon
        "retry_max": "1h",
        "scan_interval": "200ms",
        "connect_timeout": "1s",
    }
    relay = SmgRelay(tmp, config)
    relay.start()
    yield relay
    relay.stop()


def smg_queue(relay: SmgRelay, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SMG, "queue", *args, "--config", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )


def queued(relay: SmgRelay) -> dict[str, dict]:
    result = smg_queue(relay, "list", "--json")
    assert result.returncode == 0, result.stderr
    return {m["id"]: m for m in json.loads(result.stdout)}


def send(relay: SmgRelay, subject: str) -> str:
    data = (
        f"From: {SENDER}\r\nTo: bob@down.{ZONE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@qcli.test>\r\n\r\nqueue test\r\n"
    )
    result = swaks(relay.endpoint, to=f"bob@down.{ZONE}", mail_from=SENDER, data=data)
    assert result.ok, result.transcript
    return queued_as(result.transcript)


def attempts(relay: SmgRelay, queue_id: str) -> int:
    return queued(relay).get(queue_id, {}).get("attempts", -1)


def test_list_show_hold_flush_release_delete(relay: SmgRelay) -> None:
    queue_id = send(relay, "operator-1")
    entry = wait_for(
        lambda: (m := queued(relay).get(queue_id)) and m["attempts"] >= 1 and m, 15,
        what="the first (failed) attempt",
    )  # fmt: skip
    assert entry["state"] == "deferred"
    assert entry["sender"] == SENDER and entry["recipients"][0]["status"] == "pending"
    assert "127.0.23.11" in entry["recipients"][0]["last_reply"]

    text = smg_queue(relay, "list")
    assert text.returncode == 0 and queue_id in text.stdout and f"bob@down.{ZONE}" in text.stdout
    shown = smg_queue(relay, "show", queue_id)
    assert shown.returncode == 0
    assert "Subject: operator-1" in shown.stdout and "deferred until" in shown.stdout

    # flush: the deferred message is attempted now, not in an hour.
    assert smg_queue(relay, "flush").returncode == 0
    wait_for(lambda: attempts(relay, queue_id) >= 2, 10, what="the flushed attempt")

    # hold: flush does not touch it any more.
    held = smg_queue(relay, "hold", queue_id)
    assert held.returncode == 0 and "held" in held.stdout
    assert queued(relay)[queue_id]["state"] == "held"
    before = attempts(relay, queue_id)
    smg_queue(relay, "flush")
    time.sleep(1.5)  # several scans of the relay
    assert attempts(relay, queue_id) == before

    # release: due at once.
    assert smg_queue(relay, "release", queue_id).returncode == 0
    wait_for(lambda: attempts(relay, queue_id) > before, 10, what="the released attempt")
    not_held = smg_queue(relay, "release", queue_id)
    assert not_held.returncode == 1 and "is not held" in not_held.stderr

    # delete: gone, and the id is unknown from then on.
    assert smg_queue(relay, "delete", queue_id).returncode == 0
    assert queue_id not in queued(relay)
    gone = smg_queue(relay, "show", queue_id)
    assert gone.returncode == 1 and f"no message with queue id '{queue_id}'" in gone.stderr


def test_held_message_goes_only_after_release(relay: SmgRelay) -> None:
    queue_id = send(relay, "operator-2")
    wait_for(lambda: attempts(relay, queue_id) >= 1, 15, what="the first attempt")
    assert smg_queue(relay, "hold", queue_id).returncode == 0
    far = PostfixFarEnd(
        address="127.0.23.11", port=relay.config["delivery"]["port"], hostname=f"mx.down.{ZONE}",
        tls="none",
    )  # fmt: skip
    far.start()
    try:
        smg_queue(relay, "flush")
        time.sleep(1.5)  # several scans of the relay
        assert far.received() == []  # held: the far end is up, but nothing goes
        assert smg_queue(relay, "release", queue_id).returncode == 0
        got = far.wait_for_messages(1, timeout=10)
        assert b"operator-2@qcli.test" in got[0].raw
        wait_for(lambda: queue_id not in queued(relay), 10, what="dequeued")
    finally:
        far.close()


def test_unknown_ids_and_bad_config(relay: SmgRelay, tmp_path: Path) -> None:
    for action in ("show", "hold", "release", "delete"):
        result = smg_queue(relay, action, "0000000000000")
        assert result.returncode == 1
        assert "no message with queue id '0000000000000'" in result.stderr
    bad = subprocess.run(
        [*SMG, "queue", "list", "--config", str(tmp_path / "missing.toml")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and "missing.toml" in bad.stderr


def test_check_and_backup_on_a_live_relay(relay: SmgRelay, tmp_path: Path) -> None:
    queue_id = send(relay, "operator-3")
    wait_for(lambda: attempts(relay, queue_id) >= 1, 15, what="the first attempt")
    check = smg_queue(relay, "check")
    assert check.returncode == 0 and check.stdout.strip() == "ok"
    copy = tmp_path / "copy.sqlite"
    assert smg_queue(relay, "backup", str(copy)).returncode == 0
    with SpoolAdmin(copy) as admin:  # the copy is a whole spool, readable on its own
        assert queue_id in {m.id for m in admin.list()}
    again = smg_queue(relay, "backup", str(copy))
    assert again.returncode == 1 and "exists" in again.stderr
    assert smg_queue(relay, "delete", queue_id).returncode == 0
