"""The test messages: ham, spam (GTUBE), virus (EICAR), each carrying a unique tag.

The tag is the local part of the Message-ID and the Subject, so the far ends' copies can be
matched to what was sent (``<TAG@sender-domain>``). The texts are fixed test patterns: GTUBE
makes rspamd say ``reject`` (score 15+), EICAR is in the signature set the kit ships.
"""

from __future__ import annotations

import base64
import email.utils
import uuid

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
KINDS = ("ham", "spam", "virus")

HAM_TEXT = (
    "Hello Bob,\r\n\r\n"
    "the minutes of Monday's planning meeting are below. We agreed to move the review of\r\n"
    "the storage migration to Thursday at 10:00 and to keep the old cluster until the\r\n"
    "backups have been verified twice. Please send me your comments by Wednesday noon.\r\n"
    "\r\n"
    "1. Migration schedule: unchanged, cut-over on the 14th.\r\n"
    "2. Capacity: the new volumes are provisioned, monitoring is in place.\r\n"
    "3. Open questions: licence renewal for the backup software (Carol).\r\n"
    "\r\nKind regards,\r\nAlice\r\n"
)


def new_tag(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def message_id(tag: str, mail_from: str) -> str:
    return f"<{tag}@{mail_from.rpartition('@')[2] or 'localhost'}>"


def _headers(tag: str, mail_from: str, rcpt: str, extra: dict[str, str] | None) -> str:
    headers = {
        "From": f"Alice <{mail_from}>",
        "To": f"Bob <{rcpt}>",
        "Subject": f"Planning notes {tag}",
        "Date": email.utils.formatdate(localtime=False),
        "Message-ID": message_id(tag, mail_from),
        "MIME-Version": "1.0",
        **(extra or {}),
    }
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


def ham(tag: str, mail_from: str, rcpt: str, extra: dict[str, str] | None = None) -> bytes:
    head = _headers(tag, mail_from, rcpt, extra)
    head += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    return (head + "\r\n" + HAM_TEXT).encode()


def spam(tag: str, mail_from: str, rcpt: str, extra: dict[str, str] | None = None) -> bytes:
    head = _headers(tag, mail_from, rcpt, extra)
    head += "Content-Type: text/plain; charset=utf-8\r\n"
    return (head + "\r\nSpecial offer, only today!\r\n" + GTUBE + "\r\n").encode()


def virus(tag: str, mail_from: str, rcpt: str, extra: dict[str, str] | None = None) -> bytes:
    """EICAR as a base64 attachment (clamd decodes MIME before matching)."""
    boundary = f"b-{tag}"
    attachment = base64.encodebytes(EICAR.encode()).decode().replace("\n", "\r\n")
    head = _headers(tag, mail_from, rcpt, extra)
    head += f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
    body = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "The invoice is attached.\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream; name=invoice.com\r\n"
        "Content-Disposition: attachment; filename=invoice.com\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{attachment}"
        f"--{boundary}--\r\n"
    )
    return (head + "\r\n" + body).encode()


BUILDERS = {"ham": ham, "spam": spam, "virus": virus}


def build(kind: str, tag: str, mail_from: str, rcpt: str) -> bytes:
    return BUILDERS[kind](tag, mail_from, rcpt)
