"""A far-end mail server: Postfix 3.7 run by hand as its own instance (never /etc/postfix).

It has its own config_directory, queue_directory and data_directory in a temp dir, its master
runs in the foreground (`master -c DIR -d`, no `postfix start`, so no multi-instance setup and
no 2 s `postfix check`), logs to a file through postlogd (`maillog_file`), accepts mail for any
domain from anyone, and delivers every message through pipe(8) into a directory, keeping the
envelope. The queue directories are created here exactly as Postfix's own `postfix-files`
would (owners and modes), because the master does not create them.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from devkit import postfix

from .ca import LeafCert, TestCA
from .util import Daemon, DaemonStartError, HarnessError, free_port, run, wait_for

TLS_MODES = ("valid", "none", "wrong-name", "expired")
DELIVERY_USER = "nobody"  # pipe(8) refuses root and the mail_owner

_DELIVER_SH = """\
#!/bin/sh
# pipe(8) delivery of the test far end: the message on stdin, the envelope in argv.
# The .env file is renamed into place last: its presence means the message is complete.
set -eu
dir=$1 qid=$2 client=$3 sender=$4
shift 4
base="$dir/$(date +%s%N).$$.$qid"
cat > "$base.eml.tmp"
{
  printf 'queue_id %s\\n' "$qid"
  printf 'client %s\\n' "$client"
  printf 'sender %s\\n' "$sender"
  for rcpt in "$@"; do printf 'rcpt %s\\n' "$rcpt"; done
} > "$base.env.tmp"
mv "$base.eml.tmp" "$base.eml"
mv "$base.env.tmp" "$base.env"
"""

_RECEIVED_FROM = re.compile(r"^from (?P<helo>\S+) \((?P<name>\S+) \[(?P<ip>[^\]]+)\]\)")
_RECEIVED_TLS = re.compile(r"\(using (?P<protocol>TLSv[\d.]+) with cipher (?P<cipher>\S+)")


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the far end delivered it (LF line endings, Postfix's Received on top)."""

    raw: bytes
    mail_from: str  # "" for the null sender
    rcpt_tos: tuple[str, ...]
    client_address: str
    queue_id: str
    helo: str | None
    tls: bool
    tls_protocol: str | None
    tls_cipher: str | None

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


class PostfixFarEnd(Daemon):
    """A Postfix instance listening on `address`:`port` (free port if None).

    tls: "valid" (certificate from `ca` for `hostname`), "none" (no STARTTLS offered),
    "wrong-name" (valid certificate for another name), "expired" (expired, for `hostname`).
    reject_recipients: {address: "550 5.1.1 no such user"} (or "450 ..." for a deferral).
    main_cf: extra main.cf settings (override the defaults).
    """

    name = "postfix"

    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int | None = None,
        hostname: str = "mx.far-end.test",
        tls: str = "valid",
        ca: TestCA | None = None,
        reject_recipients: dict[str, str] | None = None,
        main_cf: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        if tls != "none" and ca is None:
            raise ValueError(f"tls={tls!r} needs a TestCA (ca=...)")
        super().__init__(workdir)
        self.address = address
        self.port = port
        self._fixed_port = port is not None
        if self._fixed_port:
            self.start_attempts = 1  # retrying the same taken port cannot help
        self.hostname = hostname
        self.tls = tls
        self.reject_recipients = dict(reject_recipients or {})
        self.main_cf = dict(main_cf or {})
        self.config_dir = self.dir / "conf"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.mail_dir = self.dir / "mail"
        self.log_path = self.dir / "maillog"
        self.certificate: LeafCert | None = self._certificate(ca) if ca else None

    # -- public API ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """ "address:port" where it listens."""
        return f"{self.address}:{self.port}"

    def received(self) -> list[ReceivedMessage]:
        """Messages delivered so far, oldest first."""
        if not self.mail_dir.is_dir():
            return []
        return [_read_message(env) for env in sorted(self.mail_dir.glob("*.env"))]

    def wait_for_messages(self, count: int = 1, timeout: float = 15.0) -> list[ReceivedMessage]:
        """Wait until at least `count` messages were delivered; return them all."""
        return wait_for(
            lambda: (msgs := self.received()) and len(msgs) >= count and msgs,
            timeout,
            what=f"{count} message(s) at {self.endpoint}\n--- maillog ---\n{self.log_tail()}",
        )

    def clear(self) -> None:
        """Forget the messages received so far."""
        for path in self.mail_dir.glob("*"):
            path.unlink(missing_ok=True)

    def queue_id_in_log(self, queue_id: str) -> bool:
        """True if the maillog mentions `queue_id` (cross-check for received())."""
        return bool(queue_id) and f"{queue_id}:" in self.log_text()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- Daemon hooks -------------------------------------------------------------------------
    def _forget_ports(self) -> None:
        if not self._fixed_port:
            self.port = None

    def _prepare(self) -> None:
        if self.port is None:
            self.port = free_port(self.address)
        self.dir.chmod(0o755)  # the pipe delivery runs as nobody and must reach mail/
        self._make_dirs()
        (self.dir / "deliver.sh").write_text(_DELIVER_SH)
        access = "".join(f"{rcpt} {reply}\n" for rcpt, reply in self.reject_recipients.items())
        (self.config_dir / "recipient_access").write_text(access)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        # Postfix waits until main.cf is ~2 s old (against half-written files); backdate it.
        past = time.time() - 60
        for path in self.config_dir.iterdir():
            os.utime(path, (past, past))

    def _command(self) -> list[str]:
        return [str(postfix.POSTFIX_DAEMON_DIR / "master"), "-c", str(self.config_dir), "-d"]

    def _ready(self) -> bool:
        assert self.port is not None
        with socket.create_connection((self.address, self.port), timeout=1) as sock:
            banner = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
        return banner.startswith(b"220")

    def _log_files(self) -> list[Path]:
        return [self._console_log(), self.log_path]

    def _start_error(self, why: str) -> DaemonStartError:
        """The master logs startup failures only to syslog (absent here): diagnose them."""
        error = super()._start_error(why)
        hints = []
        try:
            with socket.socket() as probe:
                probe.bind((self.address, self.port or 0))
        except OSError as exc:
            hints.append(f"cannot bind {self.endpoint}: {exc.strerror} (address in use?)")
        check = run(["postconf", "-c", str(self.config_dir), "-n"], check=False)
        hints += [line for line in check.splitlines() if "warning" in line or "fatal" in line]
        if not hints:
            return error
        return DaemonStartError(f"{error}\n--- diagnosis ---\n" + "\n".join(hints))

    # -- internals ----------------------------------------------------------------------------
    def _certificate(self, ca: TestCA) -> LeafCert | None:
        if self.tls == "valid":
            return ca.valid(self.hostname)
        if self.tls == "wrong-name":
            return ca.wrong_name(self.hostname)
        if self.tls == "expired":
            return ca.expired(self.hostname)
        return None

    def _make_dirs(self) -> None:
        self.config_dir.mkdir(exist_ok=True)
        postfix.make_queue_dirs(self.queue_dir, self.data_dir)
        postfix.make_owned_dir(self.mail_dir, DELIVERY_USER, "root", 0o755)

    def _main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": self.hostname,
            "mydestination": "",
            # Postfix insists inet_interfaces are interface addresses; master.cf binds the
            # real listener explicitly to address:port.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "0.0.0.0/0",  # a far end on loopback: take mail from anyone
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": (
                f"check_recipient_access texthash:{self.config_dir / 'recipient_access'}, permit"
            ),
            "default_transport": "sink:far-end",  # one nexthop: one delivery per message
            "sink_destination_recipient_limit": "1000",
            "smtpd_peername_lookup": "no",  # no reverse DNS: no internet here
            "smtp_dns_support_level": "disabled",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            # Deliver what the client sent: no header rewriting or added headers (DKIM checks).
            "local_header_rewrite_clients": "",
            "always_add_missing_headers": "no",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "syslog_name": f"postfix-{self.hostname}",
            "smtpd_banner": "$myhostname ESMTP far end",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_loglevel": "1",
            **self._tls_settings(),
            **self.main_cf,
        }
        return postfix.main_cf("tests/harness/postfix.py", settings)

    def _master_cf(self) -> str:
        deliver = (
            f"/bin/sh {self.dir / 'deliver.sh'} {self.mail_dir}"
            " ${queue_id} ${client_address} ${sender} ${recipient}"
        )
        sink = postfix.Service(
            "sink",
            "unix",
            "-",
            "n",
            "n",
            "-",
            "-",
            f"pipe null_sender= user={DELIVERY_USER}\n  argv={deliver}",
        )
        stock = ["cleanup", "qmgr", "tlsmgr", "rewrite", "bounce", "defer", "trace", "verify"]
        stock += ["flush", "proxymap", "showq", "error", "retry", "discard", "anvil", "scache"]
        return postfix.master_cf(
            "tests/harness/postfix.py", [postfix.smtpd(self.endpoint), *stock, "postlog", sink]
        )

    def _tls_settings(self) -> dict[str, str]:
        if self.tls == "none" or self.certificate is None:
            return {"smtpd_tls_security_level": "none"}
        return {
            "smtpd_tls_security_level": "may",
            "smtpd_tls_chain_files": str(self.certificate.pem_path),
        }


def _read_message(env_path: Path) -> ReceivedMessage:
    fields: dict[str, list[str]] = {}
    for line in env_path.read_text().splitlines():
        key, _, value = line.partition(" ")
        fields.setdefault(key, []).append(value)
    raw = env_path.with_suffix(".eml").read_bytes()
    received = _first_received(raw)
    origin = _RECEIVED_FROM.search(received)
    tls = _RECEIVED_TLS.search(received)
    return ReceivedMessage(
        raw=raw,
        mail_from=fields.get("sender", [""])[0],
        rcpt_tos=tuple(fields.get("rcpt", [])),
        client_address=fields.get("client", [""])[0],
        queue_id=fields.get("queue_id", [""])[0],
        helo=origin["helo"] if origin else None,
        tls=tls is not None,
        tls_protocol=tls["protocol"] if tls else None,
        tls_cipher=tls["cipher"] if tls else None,
    )


def _first_received(raw: bytes) -> str:
    """The Received header Postfix added (the first one), unfolded."""
    msg = email.message_from_bytes(raw.split(b"\n\n", 1)[0] + b"\n\n")
    value = msg.get("Received")
    if value is None:
        raise HarnessError(f"delivered message has no Received header:\n{raw[:500]!r}")
    return " ".join(str(value).split())


def postfix_available() -> bool:
    return (postfix.POSTFIX_DAEMON_DIR / "master").exists() and shutil.which("postconf") is not None
