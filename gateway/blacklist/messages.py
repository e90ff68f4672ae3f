"""The words the monitor sends: notices to operations, removal mails, ticket payloads.

Everything is rendered from the state database at send time, so a notice names what is true
then (the ticket opened a moment before, a removal mail that failed and will be retried).
"""

from __future__ import annotations

import textwrap
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from zoneinfo import ZoneInfo

from gateway.blacklist.state import FAILED, PENDING, REMOVAL_MAIL, TICKET_OPEN, parse_iso
from gateway.config import Config

RUNBOOK = 'docs/blacklist.md, runbook "A gateway is listed on a blacklist"'


def sender(config: Config) -> str:
    return config.blacklist.mail_from or f"smg-blacklist@{config.gateway.hostname}"


def when(stamp: str | None, timezone: str) -> str:
    """``2026-11-27 04:00:03 UTC (05:00:03 CET)`` from a stored UTC timestamp."""
    if not stamp:
        return "-"
    moment = parse_iso(stamp)
    if timezone == "UTC":
        return f"{moment:%Y-%m-%d %H:%M:%S} UTC"
    local = moment.astimezone(ZoneInfo(timezone))
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({local:%H:%M:%S %Z} {timezone})"


def list_label(listing: dict[str, Any]) -> str:
    """``Spamhaus ZEN (zen.spamhaus.org)``, or just the zone when it has no other name."""
    name, zone = listing["list_name"], listing["zone"]
    return zone if name == zone else f"{name} ({zone})"


def _wrap(label: str, text: str) -> str:
    """``Label:        text`` wrapped at 78 columns, continuation lines under the text."""
    return textwrap.fill(
        text,
        width=78,
        initial_indent=f"{label:<15}",
        subsequent_indent=" " * 15,
        break_long_words=False,  # never cut a URL
        break_on_hyphens=False,
    )


def duration(start: str, end: str) -> str:
    """``2 d 3 h 4 min`` between two stored timestamps."""
    seconds = int((parse_iso(end) - parse_iso(start)).total_seconds())
    return human_seconds(seconds)


def human_seconds(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{minutes} min"]
    return " ".join(part for part in parts if part and part != "0 min") or "0 min"


def _mail(config: Config, to: list[str], subject: str, body: str, **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender(config)
    message["To"] = ", ".join(to)
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=config.gateway.hostname)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies, please
    message.set_content(body)
    return message


def _item(listing: dict[str, Any], kind: str) -> dict[str, Any] | None:
    items = [item for item in listing["outbox"] if item["kind"] == kind]
    return items[-1] if items else None


def _removal_mail_line(listing: dict[str, Any], tz: str) -> str:
    item = _item(listing, REMOVAL_MAIL)
    if item is None:
        return ""
    target = listing["removal_mail"]
    if listing["removal_mail_sent_at"]:
        sent = when(listing["removal_mail_sent_at"], tz)
        return f"Removal mail:  sent to {target} at {sent} (copy to this mailbox)"
    if item["state"] == FAILED:
        return f"Removal mail:  NOT sent to {target}, gave up: {item['last_error']}"
    error = f": {item['last_error']}" if item["last_error"] else ""
    return f"Removal mail:  not sent to {target} yet{error} (retried at the next check)"


def _ticket_line(listing: dict[str, Any], ticket_configured: bool) -> str:
    if listing["ticket_id"]:
        return f"Ticket:        {listing['ticket_id']}"
    item = _item(listing, TICKET_OPEN)
    if not ticket_configured or item is None:
        return "Ticket:        none (blacklist.ticket_url is not configured)"
    error = f": {item['last_error']}" if item["last_error"] else ""
    if item["state"] == PENDING:
        return f"Ticket:        not opened yet{error} (retried at the next check)"
    return f"Ticket:        NOT opened, gave up{error}"


def listed_notice(config: Config, listing: dict[str, Any], removal_note: str) -> EmailMessage:
    tz = config.blacklist.timezone
    weight = (
        "a MAJOR list: many receivers refuse mail from this address"
        if listing["major"]
        else "a minor list: some receivers refuse or down-score mail from this address"
    )
    lines = [
        textwrap.fill(f"{listing['ip']} is listed on {list_label(listing)}, {weight}.", 78),
        "",
        f"Address:       {listing['ip']}",
        f"List:          {list_label(listing)}, {'major' if listing['major'] else 'minor'}",
        _wrap("Answer:", listing["meaning"]),
        f"Reason (TXT):  {listing['reason'] or '(the list gives none)'}",  # as given: URLs
        f"Listed since:  {when(listing['opened_at'], tz)}",
        f"               (first seen by the check on {config.gateway.hostname}; "
        "the list may have listed it earlier)",
        "",
        f"Removal request #{listing['request_id']}, "
        f"opened {when(listing['request_opened_at'], tz)}",
        _wrap("Procedure:", listing["procedure_text"]),
    ]
    if removal_note:
        lines.append(_wrap("How it works:", removal_note))
    lines += [
        line
        for line in (
            _removal_mail_line(listing, tz),
            _ticket_line(listing, config.blacklist.ticket_url is not None),
        )
        if line
    ]
    lines += [
        "",
        "Next steps:",
        f"  1. smg blacklist status --config {config.source}",
        f"  2. find the cause: the gateway's log for mail from {listing['ip']}",
        "     around the time above (usually spam that slipped through)",
        "  3. follow the procedure above; the daily check closes the request and mails you",
        "     when the listing is gone.",
        f"Runbook: {RUNBOOK}",
    ]
    subject = f"[smg blacklist] LISTED: {listing['ip']} on {list_label(listing)}" + (
        " - major list" if listing["major"] else ""
    )
    return _mail(config, [config.blacklist.operations_mailbox or ""], subject, "\n".join(lines))


def delisted_notice(config: Config, listing: dict[str, Any]) -> EmailMessage:
    tz = config.blacklist.timezone
    lasted = duration(listing["opened_at"], listing["closed_at"])
    if listing["ticket_id"]:
        ticket = f"Ticket:        {listing['ticket_id']} (closed by this check)"
    else:
        ticket = "Ticket:        none"
    lines = [
        f"{listing['ip']} is no longer listed on {list_label(listing)}.",
        "",
        f"Address:       {listing['ip']}",
        f"List:          {list_label(listing)}",
        f"Listed since:  {when(listing['opened_at'], tz)}",
        f"Gone at:       {when(listing['closed_at'], tz)}",
        f"Lasted:        {lasted} (between the checks that saw it listed and gone)",
        f"Request:       #{listing['request_id']} closed",
        ticket,
    ]
    subject = f"[smg blacklist] DELISTED: {listing['ip']} on {list_label(listing)} after {lasted}"
    return _mail(config, [config.blacklist.operations_mailbox or ""], subject, "\n".join(lines))


def removal_mail(config: Config, listing: dict[str, Any]) -> EmailMessage:
    """The removal request to the provider; replies go to the operations mailbox."""
    ops = config.blacklist.operations_mailbox or sender(config)
    body = "\n".join(
        [
            "Hello,",
            "",
            f"please remove {listing['ip']} from {list_label(listing)}.",
            "",
            f"{listing['ip']} is an outbound mail gateway ({config.gateway.hostname}) of a "
            "managed mail service.",
            "Mail that our filters classify as spam leaves through separate gateways; we are",
            "investigating how the mail that led to this listing got through and will stop it.",
            "",
            f"First seen listed by us: {when(listing['opened_at'], 'UTC')}",
            f"Your list's answer:      {listing['meaning']}",
            f"Your list's reason:      {listing['reason'] or '-'}",
            "",
            f"Please reply to {ops} with any question.",
            "",
            "Thank you,",
            f"Mail operations <{ops}>",
        ]
    )
    subject = f"Removal request for {listing['ip']} ({listing['zone']})"
    return _mail(config, [listing["removal_mail"]], subject, body, Cc=ops, Reply_To=ops)


def ticket_open_payload(config: Config, listing: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": "open",
        "request_id": listing["request_id"],
        "ip": listing["ip"],
        "zone": listing["zone"],
        "list": listing["list_name"],
        "major": bool(listing["major"]),
        "codes": listing["codes"].split(),
        "meaning": listing["meaning"],
        "reason": listing["reason"],
        "since": listing["opened_at"],
        "procedure": listing["procedure"],
        "procedure_text": listing["procedure_text"],
        "removal_url": listing["removal_url"],
        "removal_mail": listing["removal_mail"],
        "gateway": config.gateway.hostname,
    }


def ticket_close_payload(config: Config, listing: dict[str, Any]) -> dict[str, Any]:
    seconds = int(
        (parse_iso(listing["closed_at"]) - parse_iso(listing["opened_at"])).total_seconds()
    )
    return {
        "action": "close",
        "request_id": listing["request_id"],
        "ticket_id": listing["ticket_id"],
        "ip": listing["ip"],
        "zone": listing["zone"],
        "list": listing["list_name"],
        "since": listing["opened_at"],
        "delisted_at": listing["closed_at"],
        "duration_seconds": seconds,
        "gateway": config.gateway.hostname,
    }
