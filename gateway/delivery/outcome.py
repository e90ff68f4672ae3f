"""What an attempt did: one :class:`RcptOutcome` per recipient, turned into the spool's
:class:`AttemptResult` (with the NDR for the bounced ones, queued in the same transaction) and
into the ``delivery`` log lines and metrics."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import dsn
from gateway.config import Config
from gateway.log import event
from gateway.metrics import Metrics
from gateway.queue.model import (
    AttemptResult,
    DeliveryStatus,
    HoldReason,
    MessageKind,
    MessageState,
    NewMessage,
    QueuedMessage,
    RecipientStatus,
    RecipientUpdate,
    Route,
)
from gateway.tls.verify import NO_TLS, TlsOutcome

log = logging.getLogger("smg.delivery")

SENT, DEFERRED, BOUNCED, HELD = DeliveryStatus

# Recipients as (position in the message, address).
Rcpts = list[tuple[int, str]]


@dataclass
class RcptOutcome:
    """What happened to one recipient in this attempt."""

    position: int
    address: str
    status: DeliveryStatus
    reply: str = ""  # the far end's reply ("550 5.1.1 ...") or our own reason
    enhanced: str = ""  # RFC 3463 status for the NDR
    remote_mta: str | None = None  # host name (for the NDR's Remote-MTA)
    relay: str = ""  # host[ip]:port (for the log)
    tls: TlsOutcome = NO_TLS
    from_far_end: bool = False  # reply came from the far end (Diagnostic-Code: smtp;)


def everyone(rcpts: Rcpts, status: DeliveryStatus, reply: str, enhanced: str) -> list[RcptOutcome]:
    """The same outcome of our own for every recipient (no far end said it)."""
    return [RcptOutcome(p, a, status, reply, enhanced) for p, a in rcpts]


def reply_text(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}".strip()


def code_status(code: int) -> DeliveryStatus:
    return SENT if 200 <= code < 300 else BOUNCED if code >= 500 else DEFERRED


# --- the spool's record of the attempt ------------------------------------------------------

_RECIPIENT_STATUS = {SENT: RecipientStatus.DELIVERED, BOUNCED: RecipientStatus.BOUNCED}


def attempt_result(
    config: Config, now: float, message: QueuedMessage, outcomes: list[RcptOutcome]
) -> AttemptResult:
    """The spool operation for this attempt: recipient updates, the next state and time, the
    NDR for the bounced recipients.  Past ``delivery.max_lifetime`` what is not done bounces."""
    delivery = config.delivery
    if now - message.created_at >= delivery.max_lifetime:
        _expire(outcomes, delivery.max_lifetime)
    updates = [
        RecipientUpdate(
            o.position,
            _RECIPIENT_STATUS.get(o.status, RecipientStatus.PENDING),
            o.reply or None,
            o.remote_mta,
        )
        for o in outcomes
    ]
    attempts = message.attempts + 1
    backoff = min(delivery.retry_initial * 2 ** (attempts - 1), delivery.retry_max)
    next_attempt = min(now + backoff, message.created_at + delivery.max_lifetime)
    state, hold_reason = MessageState.DEFERRED, None
    if any(o.status == HELD for o in outcomes):
        state, hold_reason = MessageState.HELD, HoldReason.TLS
        hold_retry = config.tls_policy.hold_retry
        next_attempt = min(now + hold_retry, message.created_at + delivery.max_lifetime)
    complete = len(outcomes) == len(message.pending) and all(
        o.status in (SENT, BOUNCED) for o in outcomes
    )
    ndr = make_ndr(config, now, message, outcomes)
    return AttemptResult(message.id, updates, state, next_attempt, hold_reason, ndr, complete)


def _expire(outcomes: list[RcptOutcome], max_lifetime: float) -> None:
    for o in outcomes:
        if o.status in (DEFERRED, HELD):
            days = max_lifetime / 86400
            o.status = BOUNCED
            o.enhanced = o.enhanced if o.enhanced.startswith("4.") else "4.4.7"
            o.reply = f"message expired after {days:g} days in the queue; last: {o.reply}"
            o.from_far_end = False


def make_ndr(
    config: Config, now: float, message: QueuedMessage, outcomes: list[RcptOutcome]
) -> NewMessage | None:
    """The NDR to the sender for the bounced recipients (never to the null sender, never for
    an NDR: no bounce loops)."""
    bounced = [o for o in outcomes if o.status == BOUNCED]
    if not bounced or not message.sender or message.kind == MessageKind.NDR:
        return None
    failed = [
        dsn.FailedRecipient(
            address=o.address,
            status=o.enhanced or "5.0.0",
            diagnostic=o.reply if o.from_far_end else None,
            remote_mta=o.remote_mta,
            reason="" if o.from_far_end else o.reply,
            last_attempt=now,
        )
        for o in bounced
    ]
    data = dsn.make_ndr(
        hostname=config.gateway.hostname,
        sender=message.sender,
        original=message.data,
        failed=failed,
        queue_id=message.id,
        arrival=message.created_at,
        facts=message.facts,
    )
    return NewMessage(
        "", [message.sender], data, kind=MessageKind.NDR, facts={"ndr_for": message.id}
    )


# --- the log and the metrics ----------------------------------------------------------------

_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9._-]{1,64})")


def queued_as(reply: str) -> str | None:
    """The next hop's queue id from a 250 reply: ``250 2.0.0 Ok: queued as 1KABC`` (smg,
    Postfix), ``250 OK id=1abc-...`` (Exim)."""
    match = _QUEUED_AS.search(reply) or re.search(r"\bid=([A-Za-z0-9._-]{1,64})", reply)
    return match[1] if match else None


def log_attempt(
    message: QueuedMessage,
    outcomes: list[RcptOutcome],
    took: float,
    clock: Callable[[], float],
    metrics: Metrics | None,
) -> None:
    """One line per attempt and outcome: recipients with the same status, relay, TLS and
    reply share a line (``delivery`` event, see gateway/log.py)."""
    delay = clock() - message.created_at
    groups: dict[tuple[DeliveryStatus, str, TlsOutcome, str], list[str]] = {}
    for o in outcomes:
        groups.setdefault((o.status, o.relay, o.tls, o.reply), []).append(o.address)
    for (status, relay, tls, reply), addresses in groups.items():
        fields: dict[str, Any] = {
            "to": ",".join(f"<{a}>" for a in addresses),
            "relay": relay or "none",
            "tls": tls.version or "none",
        }
        if tls.encrypted:
            fields["cipher"] = tls.cipher
            fields["verify"] = tls.verification + (f" ({tls.detail})" if tls.detail else "")
        fields.update(
            delay=f"{delay:.2f}",
            attempt_time=f"{took:.3f}",
            attempts=message.attempts + 1,
            status=status,
            reply=reply,
        )
        if message.route == Route.BAD_GATEWAY:
            fields["route"] = Route.BAD_GATEWAY
        next_id = queued_as(reply) if status == DeliveryStatus.SENT else None
        if next_id:  # the next hop's queue id: smg trace follows the message with it
            fields["queued_as"] = next_id
        if message.tenant:
            fields["tenant"] = message.tenant
        level = logging.WARNING if status in (BOUNCED, HELD) else logging.INFO
        event(log, "delivery", message.id, level=level, **fields)
    if metrics is not None:
        with contextlib.suppress(Exception):  # counting must never fail a recorded attempt
            for o in outcomes:
                metrics.delivery_outcome(o.status)
                if message.tenant and o.status in (DeliveryStatus.DEFERRED, BOUNCED):
                    metrics.inc(f"smg_tenant_recipients_{o.status}_total", tenant=message.tenant)
