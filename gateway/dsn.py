"""Non-delivery reports (RFC 3464) and the virus information mail.

An NDR is ``multipart/report; report-type=delivery-status`` with three parts:

1. ``text/plain``: why, in words a customer understands (for rerouted spam: that the message
   was classified as spam, its score and the rules that fired);
2. ``message/delivery-status``: per-message fields (``Reporting-MTA``, ``Arrival-Date``) and one
   block per failed recipient (``Final-Recipient``, ``Action``, ``Status``, ``Remote-MTA``,
   ``Diagnostic-Code`` with the far end's reply);
3. ``text/rfc822-headers``: the original message's header section only, never its body.

The bytes are built by hand (CRLF line ends, 7bit where possible) rather than through
``email.message`` so that the delivery-status fields come out exactly as RFC 3464 writes them.
NDRs go from ``MAILER-DAEMON@<hostname>`` to the envelope sender and are queued with the null
sender, so an NDR that cannot be delivered never causes another (no bounce loops).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import re
import secrets
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_FIELD_START = re.compile(rb"\r\n(?=[^ \t])")  # a CRLF that ends a header field
MAX_QUOTED = 16 * 1024  # bytes of original header fields a virus notice quotes, at most
MAX_SHOWN = 200  # characters of the original's Subject or Message-ID shown in a notice


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the NDR reports on."""

    address: str
    status: str  # RFC 3463 enhanced status, e.g. "5.1.1"
    diagnostic: str | None = None  # the far end's reply, e.g. "550 5.1.1 <x@y>: no such user"
    remote_mta: str | None = None  # the host name that gave the reply
    reason: str = ""  # our own words when there is no far-end reply (null MX, expired, TLS)
    action: str = "failed"
    last_attempt: float | None = None


def status_from_reply(code: int, text: str, default: str | None = None) -> str:
    """The enhanced status code in an SMTP reply, else one derived from the reply code."""
    match = _STATUS_RE.search(text or "")
    if match and match.group(1) == str(code)[0]:
        return ".".join(match.groups())
    if default:
        return default
    return f"{str(code)[0]}.0.0" if code else "5.0.0"


def header_section(data: bytes) -> bytes:
    """The original message's header section (up to the empty line), with CRLF line ends."""
    match = re.search(rb"\r?\n\r?\n", data)
    # Without an empty line (a bare header block): its last line end is not a field's.
    head = data[: match.start()] if match else data.rstrip(b"\r\n")
    if not match and not re.match(rb"^[!-9;-~]+:", head):
        return b""  # not a message at all (no headers): nothing to quote
    lines = re.split(rb"\r?\n", head)
    return b"\r\n".join(lines) + b"\r\n"


def bounded_headers(original: bytes, limit: int = MAX_QUOTED) -> bytes:
    """The original's header fields that fit whole in ``limit`` bytes, in their order (CRLF
    line ends); the first field that does not fit ends the block."""
    block = header_section(original)
    if len(block) <= limit:
        return block
    quoted = 0
    for match in _FIELD_START.finditer(block):
        end = match.start() + 2  # through the CRLF that ends the field
        if end > limit:
            break
        quoted = end
    return block[:quoted]


def original_fields(data: bytes) -> dict[str, str]:
    """Subject, Message-ID, From and Date of the original, decoded for humans."""
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        header_section(data) + b"\r\n"
    )
    fields = {}
    for name in ("Subject", "Message-ID", "From", "Date"):
        try:
            value = parsed.get(name)
        except Exception:  # a malformed header must not stop the NDR
            value = None
        fields[name] = _one_line(str(value)) if value is not None else ""
    return fields


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _rfc_date(when: float | None) -> str:
    return email.utils.formatdate(when if when is not None else time.time(), localtime=True)


def _field(name: str, value: str) -> str:
    """A header-style field folded at 78 characters, no CR/LF inside."""
    value = _one_line(value)
    lines = textwrap.wrap(
        f"{name}: {value}",
        width=78,
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\r\n".join(lines or [f"{name}:"])


def _is_ascii(data: bytes) -> bool:
    return all(b < 128 for b in data)


def _spam_summary(facts: Mapping[str, Any] | None) -> str:
    """Words for the human part when the message was classified as spam (rerouted mail)."""
    spam = (facts or {}).get("spam")
    if not isinstance(spam, Mapping):
        return ""
    is_spam = spam.get("is_spam", spam.get("spam", True))
    if not is_spam:
        return ""
    score = spam.get("score")
    required = spam.get("required_score", spam.get("required", spam.get("threshold")))
    symbols = spam.get("symbols", spam.get("rules", []))
    if isinstance(symbols, Mapping):  # name -> score, highest first (the spam rule's order)
        names = [
            f"{name} ({value:g})" if isinstance(value, (int, float)) else str(name)
            for name, value in symbols.items()
        ]
    elif isinstance(symbols, (list, tuple)):
        names = [s.get("name", str(s)) if isinstance(s, Mapping) else str(s) for s in symbols]
    else:
        names = []
    score_text = f"score {score}" if score is not None else "a spam score"
    if required is not None:
        score_text += f", threshold {required}"
    rules = ", ".join(names) if names else "none reported"
    return (
        f"The message was classified as spam by the Secure Mail Gateway's spam check "
        f"({score_text}; rules that fired: {rules}), so it was sent via the Bad Gateway, "
        "which could not deliver it. Please check on your side why this message was "
        "classified as spam."
    )


def _human_part(
    hostname: str,
    queue_id: str | None,
    failed: Sequence[FailedRecipient],
    fields: Mapping[str, str],
    facts: Mapping[str, Any] | None,
    intro: str | None,
) -> str:
    paragraphs = [
        intro
        or (
            f"This is the mail system at host {hostname}.\n\n"
            "I'm sorry to have to inform you that your message could not be delivered to one "
            "or more recipients. It's attached below."
        )
    ]
    spam = _spam_summary(facts)
    if spam:
        paragraphs.append(spam)
    about = [f"Queue ID:   {queue_id}"] if queue_id else []
    about += [
        f"{label:<11} {fields[key]}"
        for key, label in (
            ("Subject", "Subject:"),
            ("Message-ID", "Message-ID:"),
            ("Date", "Date:"),
        )
        if fields.get(key)
    ]
    if about:
        paragraphs.append("\n".join(about))
    for rcpt in failed:
        said = rcpt.reason or ""
        if rcpt.diagnostic:
            host = f"host {rcpt.remote_mta} said: " if rcpt.remote_mta else ""
            said = f"{said} {host}{_one_line(rcpt.diagnostic)}".strip()
        paragraphs.append(f"<{rcpt.address}>: {said or 'delivery failed'}")
    wrapped = [
        "\n".join(textwrap.fill(line, 76) if line else "" for line in p.split("\n"))
        for p in paragraphs
    ]
    return "\r\n\r\n".join(w.replace("\n", "\r\n") for w in wrapped) + "\r\n"


def _status_part(
    hostname: str,
    queue_id: str | None,
    arrival: float | None,
    failed: Sequence[FailedRecipient],
) -> str:
    per_message = [_field("Reporting-MTA", f"dns; {hostname}")]
    if queue_id:
        per_message.append(_field("X-SMG-Queue-ID", queue_id))
    per_message.append(_field("Arrival-Date", _rfc_date(arrival)))
    blocks = ["\r\n".join(per_message)]
    for rcpt in failed:
        lines = [
            _field("Final-Recipient", f"rfc822; {rcpt.address}"),
            _field("Action", rcpt.action),
            _field("Status", rcpt.status),
        ]
        if rcpt.remote_mta:
            lines.append(_field("Remote-MTA", f"dns; {rcpt.remote_mta}"))
        if rcpt.diagnostic:
            lines.append(_field("Diagnostic-Code", f"smtp; {rcpt.diagnostic}"))
        elif rcpt.reason:
            lines.append(_field("Diagnostic-Code", f"X-SMG; {rcpt.reason}"))
        lines.append(_field("Last-Attempt-Date", _rfc_date(rcpt.last_attempt)))
        blocks.append("\r\n".join(lines))
    return "\r\n\r\n".join(blocks) + "\r\n"


def _assemble(
    hostname: str,
    to: str,
    subject: str,
    human: str,
    status: str,
    original_headers: bytes,
) -> bytes:
    boundary = f"=_smg_{secrets.token_hex(12)}"
    headers = "\r\n".join(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
            _field("To", f"<{to}>"),
            _field("Subject", subject),
            f"Date: {_rfc_date(None)}",
            f"Message-ID: <{time.time_ns():x}.{secrets.token_hex(6)}@{hostname}>",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: multipart/report; report-type=delivery-status;",
            f'    boundary="{boundary}"',
            "Content-Transfer-Encoding: 7bit",
        ]
    )
    cte = "7bit" if _is_ascii(original_headers) else "8bit"
    parts = [
        headers.encode("utf-8"),
        b"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b'Content-Type: text/plain; charset="utf-8"\r\n',
        b"Content-Description: Notification\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        human.encode("utf-8"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Type: message/delivery-status\r\n",
        b"Content-Description: Delivery report\r\n\r\n",
        status.encode("utf-8"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Type: text/rfc822-headers\r\n",
        f"Content-Description: Undelivered Message Headers\r\nContent-Transfer-Encoding: {cte}"
        "\r\n\r\n".encode(),
        original_headers,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def make_ndr(
    *,
    hostname: str,
    sender: str,
    original: bytes,
    failed: Sequence[FailedRecipient],
    queue_id: str | None = None,
    arrival: float | None = None,
    facts: Mapping[str, Any] | None = None,
) -> bytes:
    """The NDR for ``failed`` recipients of ``original`` (the queued bytes), to ``sender``.

    Raises ValueError for the null sender: an NDR is never sent to ``<>``.
    """
    if not sender:
        raise ValueError("no NDR to the null sender")
    if not failed:
        raise ValueError("an NDR needs at least one failed recipient")
    headers = header_section(original)
    fields = original_fields(original)
    delayed_only = all(r.action == "delayed" for r in failed)
    subject = (
        "Delayed Mail (still being retried)"
        if delayed_only
        else "Undelivered Mail Returned to Sender"
    )
    human = _human_part(hostname, queue_id, failed, fields, facts, None)
    status = _status_part(hostname, queue_id, arrival, failed)
    return _assemble(hostname, sender, subject, human, status, headers)


def make_info_ndr(
    *,
    hostname: str,
    sender: str,
    recipients: Sequence[str],
    virus: str,
    original: bytes,
    queue_id: str | None = None,
    arrival: float | None = None,
    client_ip: str | None = None,
) -> bytes:
    """The information mail to the sender of a message refused for a virus.

    It names the virus, the Subject, the Message-ID and the recipients, and quotes the
    original's headers only, at most :data:`MAX_QUOTED` bytes of whole fields: the infected
    content never goes back out.  The caller passes as ``original`` what may be quoted: the
    cleanup step passes the header block clamd found clean, or nothing
    (``gateway.policy.notice``); the Subject and Message-ID shown come from it too.
    """
    if not sender:
        raise ValueError("no information mail to the null sender")
    quoted = bounded_headers(original)
    fields = {name: _shown(value) for name, value in original_fields(quoted).items()}
    intro_lines = [
        f"This is the mail system at host {hostname}.",
        "",
        f"Your message was not delivered because it contains a virus: {virus}.",
        "",
        "The message was rejected by the Secure Mail Gateway's virus check; it was not sent "
        "to any recipient and it is not kept. Please check the sending system for malware.",
        "",
        f"Virus:       {virus}",
        f"Subject:     {fields.get('Subject') or '(none)'}",
        f"Message-ID:  {fields.get('Message-ID') or '(none)'}",
        f"Recipients:  {', '.join(recipients)}",
    ]
    if client_ip:
        intro_lines.append(f"Client:      {client_ip}")
    reply = f"554 5.7.1 message rejected: virus found: {virus}"
    failed = [FailedRecipient(address=r, status="5.7.1", diagnostic=reply) for r in recipients]
    human = _human_part(hostname, queue_id, [], {}, None, "\n".join(intro_lines))
    status = _status_part(hostname, queue_id, arrival, failed)
    subject = f"Virus found in a message you sent: {virus}"
    return _assemble(hostname, sender, subject, human, status, quoted)


def _shown(value: str) -> str:
    return value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "..."
