"""The backlog bench's moving parts: sinks and the 421 far end on their own addresses, ``smg
serve`` that can be stopped and started on the same spool, the spool filled straight through
SQLite, Postfix with a transport per destination, and the restart probe."""

from __future__ import annotations

import json
import os
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import tree
from bench.postfix import PostfixRelay
from tests.harness.knot import KnotDNS
from tests.harness.util import tcp_connectable, terminate_pid, wait_for

ROOT = Path(__file__).resolve().parents[2]
SINK_IP, SMG_IP, POSTFIX_IP, DEAD_IP = "127.0.27.10", "127.0.27.11", "127.0.27.12", "127.0.27.13"
DNS_IP, SOURCE_IP = "127.0.27.53", "127.0.27.5"
HEALTHY, DEAD = "bob@bench-far.test", "carol@dead.test"
SENDER = "alice@bench-sender.test"
ZONES = {
    "bench-sender.test": "@ MX 10 mx\nmx A 127.0.27.20\n",
    "bench-far.test": f"@ MX 10 mx\nmx A {SINK_IP}\n",
    "dead.test": f"@ MX 10 mx\nmx A {DEAD_IP}\n",
}
THROTTLED = "421 4.7.0 far.bench: too many connections, try again later"


def _tools(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Sink:
    """bench.common's sink on ``ip``:``port`` counting arrivals in a state file."""

    def __init__(self, workdir: Path, ip: str, port: int, name: str) -> None:
        self.ip, self.port = ip, port
        self.state = workdir / f"{name}.state"
        self.state.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            _tools("bench.common", "sink", ip, str(port), str(self.state)), cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        wait_for(self.state.exists, 10, what=f"the sink {name}")

    def read(self) -> tuple[int, float, float]:
        parts = self.state.read_text().split()
        return (int(parts[0]), float(parts[1]), float(parts[2])) if len(parts) == 3 else (0, 0, 0)

    @property
    def cpu(self) -> float:
        return tree(self.proc.pid)[0]

    def stop(self) -> None:
        terminate_pid(self.proc.pid, 10)


class Far421:
    def __init__(self, ip: str, port: int) -> None:
        self.proc = subprocess.Popen(_tools("bench.backlog.far", ip, str(port)), cwd=ROOT,
                                     start_new_session=True)  # fmt: skip
        wait_for(lambda: tcp_connectable(ip, port), 10, what="the 421 far end")

    def stop(self) -> None:
        terminate_pid(self.proc.pid, 10)


# --- smg -------------------------------------------------------------------------------------


class Smg:
    """``smg serve`` on SMG_IP, started and stopped as often as the bench likes."""

    def __init__(self, workdir: Path, port: int, delivery_port: int, knot: KnotDNS,
                 extra: dict[str, Any]) -> None:  # fmt: skip
        self.workdir, self.port = workdir, port
        self.config = workdir / "smg.toml"
        self.spool = workdir / "spool"
        self.proc: subprocess.Popen[bytes] | None = None
        sections: dict[str, dict[str, Any]] = {
            "gateway": {
                "hostname": "smg-bench.example.net",
                "listen": [f"{SMG_IP}:{port}"],
                "spool": str(self.spool),
                "client_networks": ["127.0.0.0/8"],
                "source_address": SOURCE_IP,
            },
            "dns": {"nameservers": [knot.nameserver], "extra_public_networks": ["127.0.0.0/8"]},
            "delivery": {"port": delivery_port, "max_connections_per_host": 16},
            "virus": {"enabled": False},
            "spam": {"enabled": False},
            "mta_sts": {"enabled": False},
        }
        for section, values in extra.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def endpoint(self) -> str:
        return f"{SMG_IP}:{self.port}"

    def start(self, wait: bool = True) -> None:
        log = (self.workdir / "smg.log").open("ab")
        self.proc = subprocess.Popen(
            _tools("gateway.cli", "serve", "--config", str(self.config)),
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        log.close()
        if wait:
            wait_for(lambda: tcp_connectable(SMG_IP, self.port), 120, what="smg serve")

    @property
    def cpu(self) -> float:
        return tree(self.proc.pid)[0] if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            terminate_pid(self.proc.pid, 60)
            self.proc = None

    def cli(self, *args: str) -> tuple[float, str]:
        """``smg queue ARGS``: (seconds, output)."""
        started = time.monotonic()
        out = subprocess.run(_tools("gateway.cli", "queue", *args, "--config", str(self.config)),
                             capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
        return time.monotonic() - started, out.stdout + out.stderr


def fill_spool(db: Path, count: int, data: bytes, now: float) -> float:
    """``count`` deferred messages to DEAD, due now, written straight into the spool (the
    relay stopped): one attempt each so far, the far end's 421 as their last reply.  Returns
    the seconds it took."""
    started = time.monotonic()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    batch = 20_000
    for start in range(0, count, batch):
        ids = [f"0B{i:011d}" for i in range(start, min(count, start + batch))]
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (id, sender, data, size, route, state, created_at,"
            " next_attempt, attempts, last_attempt, destination) VALUES"
            " (?, ?, ?, ?, 'direct', 'deferred', ?, ?, 1, ?, 'dead.test')",
            [(qid, SENDER, data, len(data), now - 3600, now - 1, now - 600) for qid in ids],
        )
        conn.executemany(
            "INSERT INTO recipients (message_id, position, address, last_reply)"
            " VALUES (?, 0, ?, ?)",
            [(qid, DEAD, THROTTLED) for qid in ids],
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    os.sync()  # the fill's writeback must not land in the measured phases
    return time.monotonic() - started


# --- Postfix ---------------------------------------------------------------------------------


class PostfixBacklog(PostfixRelay):
    """bench/postfix.py's relay with one transport per destination (the healthy sink, the
    dead far end), as DNS would route them."""

    def __init__(self, sink_port: int, workdir: Path) -> None:
        super().__init__(f"{SINK_IP}:{sink_port}", POSTFIX_IP, workdir)
        self.sink_port = sink_port

    def main_cf(self) -> dict[str, str]:
        settings = super().main_cf()
        port = self.sink_port
        settings["transport_maps"] = (
            f"inline:{{bench-far.test=smtp:[{SINK_IP}]:{port}, dead.test=smtp:[{DEAD_IP}]:{port}}}"
        )
        return settings

    def postqueue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postqueue", "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    def queue_files(self, *queues: str) -> int:
        return sum(len(files) for q in queues for _, _, files in os.walk(self.queue_dir / q))

    @property
    def cpu(self) -> float:
        return tree(self.proc.pid)[0] if self.proc else 0.0


# --- the restart probe -----------------------------------------------------------------------


def restart_times(
    start: Any, host: str, port: int, sink: Sink, limit: float = 300
) -> tuple[float, float]:
    """Start the MTA (``start()``), then try one message to HEALTHY every 20 ms: seconds to
    the first 250, and to that message at the sink."""
    before = sink.read()[0]
    started = time.monotonic()
    start()
    accepted = None
    while time.monotonic() - started < limit:
        try:
            with smtplib.SMTP(host, port, timeout=10) as client:
                client.sendmail(SENDER, [HEALTHY], b"Subject: restart probe\r\n\r\nhi\r\n")
            accepted = time.monotonic() - started
            break
        except (OSError, smtplib.SMTPException):
            time.sleep(0.02)
    if accepted is None:
        raise TimeoutError("the MTA did not accept mail after its restart")
    wait_for(lambda: sink.read()[0] > before, limit, interval=0.02, what="the probe delivered")
    return accepted, time.monotonic() - started
