"""Postfix 3.7 configured by hand as a plain relay: its own config and queue directories, the
master in the foreground (``master -c DIR -d``), everything from loopback relayed to one
``relayhost`` (the bench's sink).  Durability is Postfix's own: the queue file is fsynced before
the ``250``, as the spool's commit is in ``smg serve``.

Shared by both benches: ``bench/relay`` uses it as it is, ``bench/pipeline/stack.py`` adds its
milters through :meth:`PostfixRelay.main_cf` and :meth:`PostfixRelay.master_cf`.
"""

from __future__ import annotations

import socket
from pathlib import Path

from devkit import postfix
from tests.harness.util import Daemon, free_port

# The stock services a relay needs (after its listener).
SERVICES = ["pickup", "cleanup", "qmgr", "tlsmgr", "rewrite", "bounce", "defer", "trace", "verify"]
SERVICES += ["flush", "proxymap", "smtp", "relay", "showq", "error", "retry", "discard", "anvil"]
SERVICES += ["scache", "postlog"]


class PostfixRelay(Daemon):
    """Postfix on ``host``:<free port> relaying everything to ``relayhost`` ("ip:port")."""

    name = "postfix-relay"
    start_timeout = 30.0

    def __init__(self, relayhost: str, host: str, workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.relayhost = relayhost
        self.host = host
        self.port = 0
        self.config_dir = self.dir / "conf"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "maillog"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def main_cf(self) -> dict[str, str]:
        relay_ip, relay_port = self.relayhost.rsplit(":", 1)
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": "postfix-bench.example.net",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",  # master.cf binds the real listener
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[{relay_ip}]:{relay_port}",
            # No DNS on this machine's loopback: no reverse lookups, no MX lookups.
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "syslog_name": "postfix-bench",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            # Stock values, written out: 20 parallel deliveries to the relayhost, connection
            # cache on demand (reuse when there is a backlog), fsync of queue files on.
        }

    def _prepare(self) -> None:
        self.port = self.port or free_port(self.host)
        self.dir.chmod(0o755)
        self.config_dir.mkdir(exist_ok=True)
        postfix.make_queue_dirs(self.queue_dir, self.data_dir)
        (self.config_dir / "main.cf").write_text(
            postfix.main_cf("bench/postfix.py", self.main_cf())
        )
        (self.config_dir / "master.cf").write_text(self.master_cf())

    def master_cf(self) -> str:
        return postfix.master_cf("bench/postfix.py", [postfix.smtpd(self.endpoint), *SERVICES])

    def _command(self) -> list[str]:
        return [str(postfix.POSTFIX_DAEMON_DIR / "master"), "-c", str(self.config_dir), "-d"]

    def _ready(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            banner = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
        return banner.startswith(b"220")

    def _forget_ports(self) -> None:
        self.port = 0
