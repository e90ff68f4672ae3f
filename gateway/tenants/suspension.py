"""What follows a customer's suspension: its queued spam is held, the operations mailbox is told.

The hold sweep turns the customer's spam that is waiting (rerouted to the bad gateway, active or
deferred) into held messages with reason ``suspended``: an operator releases (``smg queue
release``) or deletes them after looking.  Spam accepted after the sweep is held when it is
queued (``TenantGuard.before_queue``), so none slips out between the two.  The notice goes once
(only the worker whose call changed the state sends it), queued in the spool like any mail.
"""

from __future__ import annotations

import email.utils
import logging
import sqlite3
from typing import Any

from gateway.log import event
from gateway.queue.changes import announce_change
from gateway.queue.model import HoldReason, MessageState, Route
from gateway.queue.spool import Spool

log = logging.getLogger("smg.tenants")


def hold_spam(conn: sqlite3.Connection, tenant: str) -> int:
    return conn.execute(
        "UPDATE messages SET state = ?, hold_reason = ? WHERE tenant = ? AND route = ?"
        " AND state IN (?, ?)",
        (MessageState.HELD, HoldReason.SUSPENDED, tenant, Route.BAD_GATEWAY,
         MessageState.ACTIVE, MessageState.DEFERRED),
    ).rowcount  # fmt: skip


def notice(hostname: str, mailbox: str, tenant: str, reason: str, figures: dict[str, Any],
           held: int) -> bytes:  # fmt: skip
    lines = [
        f"The customer {tenant} was suspended on {hostname}: {reason}.",
        "",
        *(f"  {key}: {value}" for key, value in figures.items()),
        f"  queued spam held: {held}",
        "",
        "New mail of the customer gets 451 4.7.1 (its hosts retry; nothing is lost).",
        f"Runbook: docs/tenants.md. Resume: smg tenant resume {tenant} --reason '...'",
        "Held spam: smg queue list (held, suspended); release or delete it after review.",
    ]
    head = (
        f"From: Secure Mail Gateway <MAILER-DAEMON@{hostname}>\r\nTo: <{mailbox}>\r\n"
        f"Subject: [smg] customer {tenant} suspended on {hostname}\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain=hostname)}\r\n"
        "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    return (head + "\r\n".join(lines) + "\r\n").encode()


class Suspension:
    """``on_suspend`` of the intake's guard, with the spool and the config's mailbox."""

    def __init__(self, spool: Spool | None, hostname: str, mailbox: str | None) -> None:
        self.spool = spool
        self.hostname = hostname
        self.mailbox = mailbox

    async def __call__(self, tenant: Any, figures: dict[str, Any], reason: str) -> None:
        if self.spool is None:
            return
        held = await self.spool.submit(lambda conn: hold_spam(conn, tenant.name))
        announce_change(self.spool.path.parent)
        event(log, "tenant_spam_held", tenant=tenant.name, held=held)
        if self.mailbox is None:
            return
        data = notice(self.hostname, self.mailbox, tenant.name, reason, figures, held)
        queue_id = await self.spool.enqueue("", [self.mailbox], data)
        event(log, "tenant_notice", queue_id, tenant=tenant.name, to=f"<{self.mailbox}>")
