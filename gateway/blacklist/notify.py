"""Deliver the outbox: mails over SMTP to ``blacklist.notify_via``, tickets over HTTP.

Each pending item is tried once per check.  A failure is recorded on the item and it is tried
again at the next check, up to ``blacklist.notify_attempts`` checks; then it is marked failed
(``smg blacklist status`` shows it).  When the relay or the ticket system cannot be reached at
all, the other items of that channel are not tried in this check (each still counts one
attempt), so a dead relay costs one timeout, not one per item.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any, Protocol

import aiosmtplib

from gateway.blacklist import messages
from gateway.blacklist.state import (
    DELISTED_NOTICE,
    LISTED_NOTICE,
    REMOVAL_MAIL,
    TICKET_CLOSE,
    TICKET_OPEN,
    Store,
)
from gateway.blacklist.zones import ZoneSpec
from gateway.config import Config


class DeliveryError(Exception):
    """This one item could not be delivered (a refused recipient, an HTTP error status)."""


class ChannelDown(DeliveryError):
    """The relay or the ticket system cannot be reached at all."""


class Notifier(Protocol):
    async def send_mail(self, message: EmailMessage) -> None: ...

    async def post_json(
        self, url: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]: ...


class NetNotifier:
    """The real thing: SMTP without TLS to an internal relay, HTTP POST with JSON."""

    def __init__(self, config: Config) -> None:
        self.relay = config.blacklist.notify_via
        self.timeout = config.blacklist.notify_timeout

    async def send_mail(self, message: EmailMessage) -> None:
        if self.relay is None:
            raise ChannelDown("blacklist.notify_via is not configured")
        host, port = self.relay
        try:
            await aiosmtplib.send(
                message,
                hostname=host,
                port=port,
                timeout=self.timeout,
                # The relay is ours (the local smg or a smarthost inside the fleet); it applies
                # the TLS policy towards the mailbox.  Plain SMTP avoids a certificate mismatch
                # silencing the alarm.
                start_tls=False,
                use_tls=False,
            )
        except (
            aiosmtplib.SMTPConnectError,
            aiosmtplib.SMTPConnectTimeoutError,
            aiosmtplib.SMTPTimeoutError,  # a relay that accepts but does not talk
            aiosmtplib.SMTPServerDisconnected,
            OSError,
        ) as exc:
            raise ChannelDown(f"SMTP relay {host}:{port} unreachable: {exc}") from None
        except aiosmtplib.SMTPException as exc:
            raise DeliveryError(f"SMTP relay {host}:{port}: {exc}") from None

    async def post_json(
        self, url: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._post, url, payload, headers)

    def _post(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        request = urllib.request.Request(
            url,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json", **headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read(1_000_000)
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"ticket system {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ChannelDown(f"ticket system {url} unreachable: {reason}") from None
        if not body.strip():
            return {}
        try:
            reply = json.loads(body)
        except ValueError:
            raise DeliveryError(f"ticket system {url}: the reply is not JSON") from None
        return reply if isinstance(reply, dict) else {}


@dataclass
class DeliveryReport:
    sent: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)  # with "error" and "state"

    def as_dict(self) -> dict[str, Any]:
        def short(item: dict[str, Any]) -> dict[str, Any]:
            keys = ("id", "listing_id", "kind", "state", "attempts", "error")
            return {key: item[key] for key in keys if key in item}

        return {
            "sent": [short(i) for i in self.sent],
            "failed": [short(i) for i in self.failed],
        }


async def deliver_outbox(
    store: Store,
    config: Config,
    specs: dict[str, ZoneSpec],
    notifier: Notifier,
    clock: Callable[[], datetime],
) -> DeliveryReport:
    report = DeliveryReport()
    down: dict[str, str] = {}
    for item in store.pending():
        channel = "ticket" if item["kind"] in (TICKET_OPEN, TICKET_CLOSE) else "smtp"
        try:
            if channel in down:
                raise DeliveryError(f"not tried: {down[channel]}")
            ticket_id = await _deliver(item, store, config, specs, notifier)
        except DeliveryError as exc:
            if isinstance(exc, ChannelDown):
                down[channel] = str(exc)
            state = store.failed(item, clock(), str(exc), config.blacklist.notify_attempts)
            report.failed.append({**item, "error": str(exc), "state": state})
            continue
        store.sent(item, clock(), ticket_id)
        report.sent.append({**item, "state": "sent"})
    return report


async def _deliver(
    item: dict[str, Any],
    store: Store,
    config: Config,
    specs: dict[str, ZoneSpec],
    notifier: Notifier,
) -> str | None:
    """Send one item; returns the ticket id for TICKET_OPEN."""
    listing = store.listing(item["listing_id"])
    kind = item["kind"]
    if kind == LISTED_NOTICE:
        spec = specs.get(listing["zone"])
        note = spec.removal_note if spec else ""
        await notifier.send_mail(messages.listed_notice(config, listing, note))
    elif kind == DELISTED_NOTICE:
        await notifier.send_mail(messages.delisted_notice(config, listing))
    elif kind == REMOVAL_MAIL:
        await notifier.send_mail(messages.removal_mail(config, listing))
    elif kind == TICKET_OPEN:
        return await _open_ticket(config, listing, notifier)
    elif kind == TICKET_CLOSE:
        payload = messages.ticket_close_payload(config, listing)
        await notifier.post_json(_ticket_url(config), payload, _idempotency(kind, listing))
    return None


async def _open_ticket(config: Config, listing: dict[str, Any], notifier: Notifier) -> str:
    payload = messages.ticket_open_payload(config, listing)
    reply = await notifier.post_json(
        _ticket_url(config), payload, _idempotency(TICKET_OPEN, listing)
    )
    key = config.blacklist.ticket_id_field
    if reply.get(key) in (None, ""):
        raise DeliveryError(f"ticket system reply has no {key!r}: {json.dumps(reply)[:200]}")
    return str(reply[key])


def _ticket_url(config: Config) -> str:
    if not config.blacklist.ticket_url:
        raise ChannelDown("blacklist.ticket_url is not configured")
    return config.blacklist.ticket_url


def _idempotency(kind: str, listing: dict[str, Any]) -> dict[str, str]:
    """A retried POST carries the same key, so the ticket system can drop the duplicate."""
    return {"Idempotency-Key": f"smg-blacklist-{kind}-{listing['request_id']}"}
