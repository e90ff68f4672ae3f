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

from tests.harness.postfix import POSTFIX_DAEMON_DIR, QUEUE_DIRS, make_owned_dir
from tests.harness.util import Daemon, free_port

_MASTER_CF = """\
# written by bench/postfix.py: the stock services a relay needs
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


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
        for path in (self.config_dir, self.queue_dir):
            path.mkdir(exist_ok=True)
        self.queue_dir.chmod(0o755)
        for name, (owner, group, mode) in QUEUE_DIRS.items():
            make_owned_dir(self.queue_dir / name, owner, group, mode)
        make_owned_dir(self.data_dir, "postfix", "root", 0o700)
        settings = self.main_cf()
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        (self.config_dir / "master.cf").write_text(self.master_cf())

    def master_cf(self) -> str:
        return _MASTER_CF.format(listen=self.endpoint)

    def _command(self) -> list[str]:
        return [str(POSTFIX_DAEMON_DIR / "master"), "-c", str(self.config_dir), "-d"]

    def _ready(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            banner = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
        return banner.startswith(b"220")

    def _forget_ports(self) -> None:
        self.port = 0
