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

from bench.postfix import PostfixRelay as BasePostfixRelay  # noqa: E402
from tests.harness.util import Daemon  # noqa: E402


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


class PostfixRelay(BasePostfixRelay):
    """Postfix relaying mail from loopback to ``relay`` ("host:port") through ``milters``: the
    relay bench's instance (``bench/postfix.py``) plus the milters."""

    def __init__(
        self, relay: str, milters: list[str], host: str = "127.0.0.1", workdir: Path | None = None
    ) -> None:
        super().__init__(relay, host, workdir)
        self.milters = milters

    def main_cf(self) -> dict[str, str]:
        return {
            **super().main_cf(),
            "smtpd_milters": ", ".join(self.milters),
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "default_destination_concurrency_limit": "16",
            "smtp_connection_cache_on_demand": "yes",
        }

    def master_cf(self) -> str:
        # No pickup service: nothing here submits through the sendmail command.
        lines = super().master_cf().splitlines(keepends=True)
        return "".join(line for line in lines if not line.startswith("pickup "))
