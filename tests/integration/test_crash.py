"""Crash test: thousands of messages sent concurrently while ``smg serve`` is killed with
SIGKILL several times and restarted.  Every message that got a ``250`` must arrive at the far
end (Message-ID sets compared); duplicates are allowed (a kill between the far end's 250 and the
spool's record of it) but counted and reported, and the spool must pass SQLite's integrity check.

Numbers (env): SMG_CRASH_MESSAGES (default 3000), SMG_CRASH_KILLS (default 4).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller

from tests.conftest import require_binaries
from tests.harness import KnotDNS, free_port, wait_for
from tests.harness.util import pid_alive
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.integration

ZONE = "crash.test"
ZONE_TEXT = """
customer     MX 10 mx.customer
mx.customer  A 127.0.24.10
far          MX 10 mx.far
mx.far       A 127.0.24.10
"""
SENDER = f"load@customer.{ZONE}"
MESSAGES = int(os.environ.get("SMG_CRASH_MESSAGES", "3000"))
KILLS = int(os.environ.get("SMG_CRASH_KILLS", "4"))
CLIENTS = 16  # concurrent SMTP connections to the relay
SEND_TRIES = 30  # per message, while the relay is down
DEADLINE = 240.0  # seconds for the whole test, bounded


class RecordingSink:
    """The far end: records the Message-ID of every message it accepted (with repeats)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []

    async def handle_DATA(self, server, session, envelope):
        mid = _message_id(envelope.original_content)
        with self.lock:
            self.ids.append(mid)
        return "250 2.0.0 Ok"

    def seen(self) -> collections.Counter[str]:
        with self.lock:
            return collections.Counter(self.ids)


def _message_id(data: bytes) -> str:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return "<none>"


def _payload(n: int) -> tuple[str, bytes]:
    mid = f"<crash-{n}@{ZONE}>"
    body = ("crash test payload line\r\n" * 60).encode()
    head = (
        f"From: {SENDER}\r\nTo: x@far.{ZONE}\r\nSubject: crash {n}\r\nMessage-ID: {mid}\r\n\r\n"
    ).encode()
    return mid, head + body


@pytest.fixture
def sink() -> Iterator[tuple[RecordingSink, int]]:
    handler = RecordingSink()
    port = free_port("127.0.24.10")
    controller = Controller(handler, hostname="127.0.24.10", port=port)
    controller.start()
    yield handler, port
    controller.stop()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                kids.append(int(entry.name))
    return kids


class Killer:
    """Kills relay processes with SIGKILL at random moments (by PID only).

    Single process: kill it, start it again.  Several workers: alternately kill one worker
    (the supervisor starts a new one; the others and the new one must take over its mail) and
    the whole tree, supervisor and workers at once (then start the relay again).
    """

    def __init__(self, relay: SmgRelay, kills: int, workers: int) -> None:
        self.relay = relay
        self.kills = kills
        self.workers = workers
        self.done = 0
        self.restart_times: list[float] = []

    async def run(self, sending: asyncio.Event, acknowledged: Callable[[], int]) -> None:
        """Kill each time the acknowledged count passes the next of ``kills`` evenly spaced
        marks (with jitter), so the kills fall inside the load however fast the relay is."""
        rng = random.Random(4711)
        for number in range(self.kills):
            mark = MESSAGES * (number + rng.uniform(0.5, 1.0)) / (self.kills + 1)
            while acknowledged() < mark and not sending.is_set():
                await asyncio.sleep(0.01)
            if sending.is_set():
                break  # all sent: no more kills needed
            one_worker = self.workers > 1 and number % 2 == 0
            await asyncio.to_thread(self._kill_worker if one_worker else self._kill_all)
            self.done += 1

    def _kill_worker(self) -> None:
        assert self.relay.proc is not None
        supervisor = self.relay.proc.pid

        def live_workers() -> list[int]:
            return [pid for pid in _children(supervisor) if pid_alive(pid)]

        workers = wait_for(live_workers, 10, what=f"workers of {supervisor}")
        os.kill(workers[0], signal.SIGKILL)
        started = time.monotonic()
        wait_for(lambda: workers[0] not in _children(supervisor)
                 and len(live_workers()) >= self.workers, 20,
                 what="the supervisor to start a new worker")  # fmt: skip
        self.restart_times.append(time.monotonic() - started)

    def _kill_all(self) -> None:
        proc = self.relay.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)  # no more forks: the list of victims is final
        victims = [proc.pid, *_children(proc.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(p) for p in victims), 10, what="all of them dead")
        self.relay.proc = None
        started = time.monotonic()
        self.relay.start()
        self.restart_times.append(time.monotonic() - started)


async def _send_all(endpoint: str, deadline: float, acked: set[str]) -> tuple[int, int]:
    """Send MESSAGES over CLIENTS connections, adding each acknowledged Message-ID to
    ``acked``; returns (failures, tries)."""
    host, port = endpoint.rsplit(":", 1)
    pending: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for n in range(MESSAGES):
        pending.put_nowait((n, 0))
    counters = {"failed": 0, "tries": 0}

    async def client() -> None:
        smtp: aiosmtplib.SMTP | None = None
        while not pending.empty() and time.monotonic() < deadline:
            n, tries = pending.get_nowait()
            mid, data = _payload(n)
            counters["tries"] += 1
            try:
                if smtp is None or not smtp.is_connected:
                    smtp = aiosmtplib.SMTP(hostname=host, port=int(port), timeout=10,
                                           start_tls=False)  # fmt: skip
                    await smtp.connect()
                await smtp.sendmail(SENDER, [f"x@far.{ZONE}"], data)
                acked.add(mid)  # the relay said 250: it must arrive
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                if smtp is not None:
                    smtp.close()
                smtp = None
                if tries + 1 < SEND_TRIES:
                    pending.put_nowait((n, tries + 1))
                else:
                    counters["failed"] += 1
                await asyncio.sleep(0.1)  # the relay is restarting
        if smtp is not None and smtp.is_connected:
            smtp.close()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return counters["failed"], counters["tries"]


async def _load_with_kills(relay: SmgRelay, killer: Killer) -> tuple[set[str], int, int, float]:
    deadline = time.monotonic() + DEADLINE / 2
    sending_done = asyncio.Event()
    acked: set[str] = set()
    kill_task = asyncio.create_task(killer.run(sending_done, lambda: len(acked)))
    started = time.monotonic()
    failed, tries = await _send_all(relay.endpoint, deadline, acked)
    took = time.monotonic() - started
    sending_done.set()
    await kill_task
    return acked, failed, tries, took


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_loses_no_acknowledged_message(
    knot_dns: KnotDNS, sink, tmp_path: Path, workers: int
) -> None:
    require_binaries("knotd")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    recorder, sink_port = sink
    config = base_config(
        tmp_path, knot_dns.nameserver, source_address="127.0.24.5", workers=workers
    )
    config["delivery"] = {
        "port": sink_port,
        "retry_initial": "1s",
        "retry_max": "2s",
        "scan_interval": "200ms",
        "concurrency": 32,
    }
    relay = SmgRelay(tmp_path, config)
    relay.start()
    killer = Killer(relay, KILLS, workers)
    try:
        acked, failed, tries, took = asyncio.run(_load_with_kills(relay, killer))
        if relay.proc is None:
            relay.start()
        # Everything acknowledged must arrive, within a bounded time.
        wait_for(lambda: acked <= set(recorder.seen()), DEADLINE / 2, interval=0.5,
                 what="every acknowledged message at the far end")  # fmt: skip
        wait_for(lambda: not relay.queued(), 60, interval=0.5, what="an empty queue")
    finally:
        if relay.proc is not None:  # the supervisor, then any worker left behind
            leftovers = _children(relay.proc.pid)
            relay.stop()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    seen = recorder.seen()
    missing = acked - set(seen)
    duplicates = {mid: count for mid, count in seen.items() if count > 1}
    unacked_arrived = set(seen) - acked
    db = Path(config["gateway"]["spool"]) / "queue.sqlite"
    integrity = sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0]
    report = {
        "messages": MESSAGES,
        "workers": workers,
        "clients": CLIENTS,
        "kills": killer.done,
        "restart_seconds": [round(t, 2) for t in killer.restart_times],
        "send_tries": tries,
        "acknowledged": len(acked),
        "never_acknowledged": failed,
        "arrived_distinct": len(seen),
        "missing": len(missing),
        "duplicates": sum(c - 1 for c in duplicates.values()),
        "duplicated_messages": len(duplicates),
        "arrived_without_250": len(unacked_arrived),
        "sending_seconds": round(took, 1),
        "integrity_check": integrity,
    }
    print("\ncrash test report:", json.dumps(report))
    (tmp_path / "crash-report.json").write_text(json.dumps(report, indent=2))
    assert killer.done >= min(KILLS, 2), report
    assert not missing, sorted(missing)[:20]
    assert integrity == "ok"
    assert len(acked) >= MESSAGES * 0.95, report


def test_workers_do_not_outlive_a_killed_supervisor(knot_dns: KnotDNS, tmp_path: Path) -> None:
    """SIGKILL to smg serve with two workers: the workers go too (no orphans on the port)."""
    config = base_config(tmp_path, knot_dns.nameserver, workers=2)
    relay = SmgRelay(tmp_path, config)
    relay.start()
    assert relay.proc is not None
    supervisor = relay.proc.pid
    workers = wait_for(lambda: len(k := _children(supervisor)) == 2 and k, 10, what="2 workers")
    os.kill(supervisor, signal.SIGKILL)
    relay.proc.wait(timeout=10)
    relay.proc = None
    try:
        wait_for(lambda: not any(pid_alive(pid) for pid in workers), 30, what="workers gone")
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "worker_started" in relay.log_path.read_text()
