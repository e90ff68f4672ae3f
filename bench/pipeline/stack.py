"""The reference stack for the pipeline bench: Debian's Postfix with three milters.

- clamav-milter (Debian clamav-milter) asking the same clamd as the relay;
- rspamd's proxy worker in milter mode (self-scan), in the same rspamd instance as the relay's
  normal worker (see run.py);
- OpenDKIM (Debian opendkim) signing relaxed/relaxed with an RSA-2048 key, From oversigned;
- Postfix 3.7 as its own instance (own config, queue and data directories, never /etc/postfix),
  relaying everything from loopback to the sink (``relayhost``), milters in that order.

Every daemon is started by hand in the foreground under the test harness's supervisor and
stopped by its PID.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness.postfix import _QUEUE_DIRS, POSTFIX_DAEMON_DIR, _make_owned_dir  # noqa: E402
from tests.harness.util import Daemon, free_port  # noqa: E402


def _unix_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        sock.connect(str(path))
        return True


class ClamavMilter(Daemon):
    name = "clamav-milter"

    def __init__(self, clamd_socket: Path, workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.dir.chmod(0o755)  # Postfix's smtpd (user postfix) connects to the socket here
        self.clamd_socket = clamd_socket
        self.socket = self.dir / "clamav-milter.sock"

    @property
    def milter(self) -> str:
        return f"unix:{self.socket}"

    def _prepare(self) -> None:
        settings = {
            "MilterSocket": str(self.socket),
            "MilterSocketMode": "666",
            "FixStaleSocket": "yes",
            "ClamdSocket": f"unix:{self.clamd_socket}",
            "Foreground": "yes",
            "PidFile": str(self.dir / "clamav-milter.pid"),
            "OnClean": "Accept",
            "OnInfected": "Reject",
            "OnFail": "Defer",
            "AddHeader": "No",
            "MaxFileSize": "25M",
            "ReadTimeout": "120",
            "LogFile": str(self.log_path),
            "LogInfected": "Basic",
        }
        (self.dir / "clamav-milter.conf").write_text(
            "".join(f"{key} {value}\n" for key, value in settings.items())
        )

    def _command(self) -> list[str]:
        return ["clamav-milter", "-c", str(self.dir / "clamav-milter.conf")]

    def _ready(self) -> bool:
        return _unix_listening(self.socket)


class OpenDkimMilter(Daemon):
    name = "opendkim"

    def __init__(self, domain: str, selector: str, key: Path, headers: list[str]) -> None:
        # OpenDKIM refuses a config or key file below a directory others may write (/tmp):
        # its files live in a private directory under /run.
        super().__init__(Path(tempfile.mkdtemp(prefix="smg-bench-opendkim-", dir="/run")))
        self._own_dir = True
        self.dir.chmod(0o755)  # Postfix's smtpd connects to the socket here
        self.key = self.dir / "signing.key"
        shutil.copyfile(key, self.key)
        self.key.chmod(0o600)
        self.domain, self.selector = domain, selector
        self.headers = headers
        self.socket = self.dir / "opendkim.sock"

    @property
    def milter(self) -> str:
        return f"unix:{self.socket}"

    def _prepare(self) -> None:
        settings = {
            "Mode": "s",
            "Domain": self.domain,
            "Selector": self.selector,
            "KeyFile": str(self.key),
            "Socket": f"local:{self.socket}",
            "Canonicalization": "relaxed/relaxed",
            "SignHeaders": ",".join(self.headers),
            "OversignHeaders": "From",
            "InternalHosts": "127.0.0.0/8",
            "Background": "no",
            "Syslog": "no",
            "PidFile": str(self.dir / "opendkim.pid"),
            "UMask": "000",  # the socket: Postfix's smtpd runs as postfix
        }
        (self.dir / "opendkim.conf").write_text(
            "".join(f"{key} {value}\n" for key, value in settings.items())
        )

    def _command(self) -> list[str]:
        return ["opendkim", "-f", "-x", str(self.dir / "opendkim.conf")]

    def _ready(self) -> bool:
        return _unix_listening(self.socket)


_MASTER_CF = """\
# written by bench/pipeline/stack.py
{listen} inet n - n - - smtpd
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
    """Postfix relaying mail from loopback to ``relay`` ("host:port") through ``milters``."""

    name = "postfix-relay"
    start_timeout = 30.0

    def __init__(
        self, relay: str, milters: list[str], host: str = "127.0.0.1", workdir: Path | None = None
    ) -> None:
        super().__init__(workdir)
        self.relay = relay
        self.milters = milters
        self.host = host
        self.port = 0
        self.config_dir = self.dir / "conf"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "maillog"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _prepare(self) -> None:
        self.port = self.port or free_port(self.host)
        self.dir.chmod(0o755)
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.queue_dir.chmod(0o755)
        for name, (owner, group, mode) in _QUEUE_DIRS.items():
            _make_owned_dir(self.queue_dir / name, owner, group, mode)
        _make_owned_dir(self.data_dir, "postfix", "root", 0o700)
        relay_host, relay_port = self.relay.rsplit(":", 1)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": "postfix-bench.example.net",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[{relay_host}]:{relay_port}",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtpd_milters": ", ".join(self.milters),
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "syslog_name": "postfix-bench",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "default_destination_concurrency_limit": "16",
            "smtp_connection_cache_on_demand": "yes",
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(listen=self.endpoint))

    def _command(self) -> list[str]:
        return [str(POSTFIX_DAEMON_DIR / "master"), "-c", str(self.config_dir), "-d"]

    def _ready(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            banner = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
        return banner.startswith(b"220")

    def _forget_ports(self) -> None:
        self.port = 0
