"""The real ``smg serve`` process for integration tests: config written as TOML, started as a
subprocess, stopped by its PID (never by name), with its log and spool at hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.queue.admin import SpoolAdmin
from gateway.queue.model import QueuedMessage
from tests.harness.util import free_port, log_tail, tcp_connectable, terminate_pid, wait_for

SMG = [sys.executable, "-m", "gateway.cli"]


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(config: dict[str, Any]) -> str:
    """Sections of scalars, lists and inline tables; a section given as a list of tables
    (``tenants``) becomes ``[[tenants]]`` tables."""
    lines = []
    for section, values in config.items():
        tables = values if isinstance(values, list) else [values]
        header = f"[[{section}]]" if isinstance(values, list) else f"[{section}]"
        for table in tables:
            lines.append(header)
            for key, value in table.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
    return "\n".join(lines)


def base_config(tmp: Path, nameserver: str, **gateway: Any) -> dict[str, dict[str, Any]]:
    """A good gateway without scanners, listening on a free port of 127.0.0.1."""
    port = free_port("127.0.0.1")
    return {
        "gateway": {
            "hostname": "gw.smg-test.example",
            "listen": [f"127.0.0.1:{port}"],
            "spool": str(tmp / "spool"),
            "client_networks": ["127.0.0.1/32"],
            **gateway,
        },
        "dns": {
            "nameservers": [nameserver],
            "extra_public_networks": ["127.0.0.0/8"],
            "timeout": "2s",
        },
        "delivery": {"port": free_port("127.0.0.1"), "retry_initial": "1h"},
        "virus": {"enabled": False},
        "spam": {"enabled": False},
    }


class SmgRelay:
    def __init__(self, tmp: Path, config: dict[str, dict[str, Any]]) -> None:
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / "smg.toml"
        self.log_path = tmp / "smg.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return self.config["gateway"]["listen"][0]

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.endpoint.rsplit(":", 1)
        return host, int(port)

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def start(self, timeout: float = 20.0) -> None:
        self.write_config()
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*SMG, "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        (self.tmp / "smg.pid").write_text(str(self.proc.pid))
        try:
            wait_for(
                lambda: self._check_alive() and tcp_connectable(*self.host_port),
                timeout,
                what=f"smg serve on {self.endpoint}",
            )
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.log()}") from None

    def _check_alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"smg serve exited {self.proc.returncode}:\n{self.log()}")
        return True

    def reload(self) -> None:
        assert self.proc is not None
        self.write_config()
        os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        terminate_pid(self.proc.pid, timeout=40)
        code = self.proc.wait(timeout=5)
        self.proc = None
        return code

    def log(self) -> str:
        return log_tail(self.log_path, 60)

    def queued(self) -> list[QueuedMessage]:
        with SpoolAdmin(self.config["gateway"]["spool"]) as admin:
            return admin.list()


def server_said(transcript: str, reply: str) -> bool:
    """True if swaks shows a server line starting with ``reply`` (``<-``, ``<**``, ``<~``)."""
    for line in transcript.splitlines():
        marker, _, text = line.partition(" ")
        if marker.startswith("<") and text.strip().startswith(reply):
            return True
    return False


def queued_as(transcript: str) -> str:
    """The queue id from the relay's ``250 ... queued as ID`` reply in a swaks transcript."""
    line = next(
        x for x in transcript.splitlines() if "<-" in x and "250" in x and "queued" in x.lower()
    )
    return line.split()[-1]


def message_ids(relay: SmgRelay) -> list[str]:
    """The Message-ID local parts of every queued message (sorted)."""
    ids = []
    with SpoolAdmin(relay.config["gateway"]["spool"]) as admin:
        for listed in admin.list():
            data = admin.show(listed.id).data
            match = data.split(b"Message-ID: <", 1)
            ids.append(match[1].split(b"@", 1)[0].decode() if len(match) == 2 else "")
    return sorted(ids)
