"""Far-end mail hosts: a Postfix instance per network namespace, run by hand from this machine's
filesystem with its own config, queue and mail directories.

mx-tls offers STARTTLS (certificate from the lab CA), mx-plain does not. Both accept mail for any
domain and store every message as a file in one Maildir, mail/maildir/new/ (read them with
messages()), log each
connection (the client address) to their maillog, and add a Received: header naming the client
and (mx-tls) the TLS protocol used. Recipients starting with "reject-" get 550, "defer-" 450.
"""

from __future__ import annotations

import email.policy
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from devkit import postfix
from lab import net, pki
from lab.config import NETWORK, RUN_DIR, Host, host_by_name
from lab.proc import LabError, daemon_pid, log_tail, run, start_daemon, stop_daemon, wait_until
from lab.zones import PARTNER_DOMAINS, far_end_fqdn

FAREND_DIR = RUN_DIR / "farend"
MAIL_UID = 65534  # nobody: the owner of delivered mail files (virtual(8) needs a non-root uid)
MAIL_GID = 65534  # nogroup

# Postfix's stock services behind the SMTP listener, virtual(8) delivering into the Maildir.
SERVICES = ["pickup", "cleanup", "qmgr", "tlsmgr", "rewrite", "bounce", "defer", "trace", "verify"]
SERVICES += ["flush", "proxymap", "smtp", "relay", "error", "retry", "discard", "virtual", "anvil"]
SERVICES += ["scache", "postlog"]

# Which recipients the far end refuses, so tests can provoke bounces and retries.
RECIPIENT_ACCESS = """\
/^reject-/  550 5.1.1 Recipient rejected by the lab far end
/^defer-/   450 4.2.0 Recipient deferred by the lab far end
"""
# One Maildir for every recipient (virtual(8) allows no per-recipient substitution); each message
# names its envelope recipient in X-Original-To:/Delivered-To: and its sender in Return-Path:.
MAILDIR = "maildir"


def instance_dir(host: Host) -> Path:
    return FAREND_DIR / host.name


def config_dir(host: Host) -> Path:
    return instance_dir(host) / "config"


def mail_dir(host: Host) -> Path:
    return instance_dir(host) / "mail"


def maillog(host: Host) -> Path:
    return instance_dir(host) / "maillog"


def daemon_name(host: Host) -> str:
    return f"postfix-{host.name}"


def served_domains(host: Host) -> list[str]:
    return sorted(d for d, mx in PARTNER_DOMAINS.items() if mx == host)


def hostname(host: Host) -> str:
    domains = served_domains(host)
    return far_end_fqdn(domains[0]) if domains else host.fqdn


def main_cf(host: Host, cert: pki.Issued | None) -> str:
    base = instance_dir(host)
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(base / "queue"),
        "data_directory": str(base / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": hostname(host),
        "myorigin": "$myhostname",
        "mydestination": "",
        "biff": "no",
        "append_dot_mydomain": "no",
        "inet_interfaces": host.address,
        "inet_protocols": "ipv4",
        "mynetworks": f"127.0.0.0/8 {NETWORK}",
        "maillog_file": str(maillog(host)),
        "maillog_file_prefixes": str(FAREND_DIR),
        "message_size_limit": "52428800",
        "virtual_mailbox_limit": "0",  # Maildir: no size limit (must be >= message size)
        # Accept mail for any domain: the lab's MX records decide who gets what.
        "virtual_mailbox_domains": f"regexp:{config_dir(host) / 'all_domains'}",
        "virtual_mailbox_base": str(mail_dir(host)),
        "virtual_mailbox_maps": f"static:{MAILDIR}/",
        "virtual_uid_maps": f"static:{MAIL_UID}",
        "virtual_gid_maps": f"static:{MAIL_GID}",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": (
            f"check_recipient_access regexp:{config_dir(host) / 'recipient_access'}"
        ),
        # A far end never sends mail out (bounces included).
        "default_transport": "error:the lab far end sends no mail",
        "relay_transport": "error:the lab far end sends no mail",
    }
    if cert is not None:
        settings |= {
            "smtpd_tls_cert_file": str(cert.cert),
            "smtpd_tls_key_file": str(cert.key),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        }
    else:
        settings["smtpd_tls_security_level"] = "none"
    return postfix.main_cf("lab/farend.py: a far-end MX of the lab's internet", settings)


def master_cf() -> str:
    # No chroot: the instance runs from this machine's filesystem.
    return postfix.master_cf("lab/farend.py", [postfix.smtpd("smtp"), *SERVICES])


def prepare(host: Host) -> None:
    base = instance_dir(host)
    for sub in ("config", "queue", "data"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    mail_dir(host).mkdir(parents=True, exist_ok=True)
    os.chown(mail_dir(host), MAIL_UID, MAIL_GID)
    cert = None
    if host.role == "tls":
        name = hostname(host)
        cert = pki.issue(host.name, [name, host.fqdn], [host.address])
    conf = config_dir(host)
    (conf / "main.cf").write_text(main_cf(host, cert))
    (conf / "master.cf").write_text(master_cf())
    (conf / "all_domains").write_text("/./ OK\n")
    (conf / "recipient_access").write_text(RECIPIENT_ACCESS)
    maillog(host).touch()
    # Creates the queue directories with Postfix's own owners and modes (and checks the config).
    # Inside the netns: Postfix refuses an inet_interfaces address this namespace lacks.
    check = net.netns_exec(host, ["postfix", "-c", str(conf), "check"])
    try:
        run(check, env=_env(host), timeout=60)
    except LabError as exc:
        # Without a terminal or syslog, postfix(1) prints nothing: say how to see the reason.
        raise LabError(f"{exc}\nrun it in a terminal to see why: {' '.join(check)}") from exc
    data = base / "data"
    shutil.chown(data, "postfix", "postfix")


def _env(host: Host) -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MAIL_CONFIG": str(config_dir(host))}


def start(host: Host) -> None:
    """The Postfix master in the far end's netns, in the foreground (so we keep its PID)."""
    argv = net.netns_exec(
        host, [str(postfix.POSTFIX_DAEMON_DIR / "master"), "-c", str(config_dir(host)), "-d"]
    )
    start_daemon(daemon_name(host), argv)


def smtp_answers(address: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, 25), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(256).startswith(b"220")
    except OSError:
        return False


def wait_ready(host: Host, *, timeout: float = 20) -> None:
    name = daemon_name(host)

    def ready() -> bool:
        if daemon_pid(name) is None:
            raise LabError(f"{name} exited:\n{log_tail(name)}\n{_maillog_tail(host)}")
        return smtp_answers(host.address)

    wait_until(f"{name} to answer SMTP", ready, timeout=timeout, interval=0.1)


def _maillog_tail(host: Host, lines: int = 10) -> str:
    try:
        return "\n".join(maillog(host).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(host: Host) -> None:
    stop_daemon(daemon_name(host), timeout=10)


def describe(host: Host) -> dict[str, object]:
    return {
        "address": host.address,
        "fqdn": hostname(host),
        "role": host.role,
        "starttls": host.role == "tls",
        "domains": served_domains(host),
        "netns": host.netns,
        "mail_dir": str(mail_dir(host)),
        "maillog": str(maillog(host)),
        "config_dir": str(config_dir(host)),
        "cert": str(pki.PKI_DIR / "certs" / f"{host.name}.crt") if host.role == "tls" else None,
    }


# -- reading what the far ends received (the tests' side) ------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    """One message as stored by a far end."""

    path: Path
    recipient: str  # the envelope recipient (X-Original-To:)
    sender: str  # the envelope sender (Return-Path:, "" for bounces)
    client_address: str | None  # who handed it over (from the far end's Received: header)
    tls_protocol: str | None  # e.g. "TLSv1.3"; None when the session was not encrypted
    message: EmailMessage


def messages(far_end: str) -> list[ReceivedMail]:
    """Every message the far end (e.g. "mx-tls") has stored, oldest first."""
    box = mail_dir(host_by_name(far_end)) / MAILDIR
    files = [f for sub in ("new", "cur") for f in (box / sub).glob("*") if f.is_file()]
    return [_read_mail(f) for f in sorted(files, key=lambda f: (f.stat().st_mtime_ns, f.name))]


def wait_for_messages(
    far_end: str,
    count: int = 1,
    *,
    timeout: float = 30,
    match: Callable[[ReceivedMail], bool] | None = None,
) -> list[ReceivedMail]:
    """Bounded wait until at least count (matching) messages are stored; returns them."""
    found: list[ReceivedMail] = []

    def enough() -> bool:
        nonlocal found
        found = [m for m in messages(far_end) if match is None or match(m)]
        return len(found) >= count

    wait_until(f"{count} message(s) at {far_end}", enough, timeout=timeout, interval=0.2)
    return found


def clear_messages(far_end: str) -> None:
    box = mail_dir(host_by_name(far_end)) / MAILDIR
    for sub in ("new", "cur"):
        for f in (box / sub).glob("*"):
            f.unlink(missing_ok=True)


def connected_clients(far_end: str) -> list[str]:
    """Client addresses of every SMTP connection in the far end's maillog, in order."""
    try:
        text = maillog(host_by_name(far_end)).read_text(errors="replace")
    except OSError:
        return []
    return CONNECT_RE.findall(text)


CONNECT_RE = re.compile(r"smtpd\[\d+\]: connect from [^\[\s]*\[([0-9.]+)\]")
RECEIVED_CLIENT_RE = re.compile(r"\[([0-9.]+)\]")
RECEIVED_TLS_RE = re.compile(r"\(using (TLSv[0-9.]+)")


def _read_mail(path: Path) -> ReceivedMail:
    with open(path, "rb") as f:
        msg = BytesParser(policy=email.policy.default).parse(f)
    received = str(msg.get_all("Received", [""])[0])
    client = RECEIVED_CLIENT_RE.search(received)
    tls = RECEIVED_TLS_RE.search(received)
    return ReceivedMail(
        path=path,
        recipient=str(msg.get("X-Original-To", "")).strip(),
        sender=str(msg.get("Return-Path", "")).strip().strip("<>"),
        client_address=client.group(1) if client else None,
        tls_protocol=tls.group(1) if tls else None,
        message=msg,
    )
