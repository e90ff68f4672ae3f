"""The spool's records and the words it stores.

Every state, route, kind, hold reason and status is a :class:`~enum.StrEnum` whose values are
the strings in the database (and in logs, CLI output and metrics), so a member compares equal
to the text it was stored as.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class MessageState(StrEnum):
    """``active``: new, or being delivered; ``deferred``: waiting for ``next_attempt``;
    ``held``: an operator's or the policy's hold, or a TLS hold (retried on its schedule)."""

    ACTIVE = "active"
    DEFERRED = "deferred"
    HELD = "held"


class Route(StrEnum):
    DIRECT = "direct"  # to the recipient domain's MX hosts
    BAD_GATEWAY = "bad_gateway"  # spam on a good gateway: only via routing.bad_gateways


class MessageKind(StrEnum):
    MAIL = "mail"
    NDR = "ndr"  # a non-delivery report we made: never bounced itself


class HoldReason(StrEnum):
    TLS = "tls"  # TLS could not be had: retried every tls_policy.hold_retry
    OPERATOR = "operator"  # smg queue hold: never due until released
    POLICY = "policy"  # a policy rule held it at intake
    SUSPENDED = "suspended"  # spam of a suspended customer: never due until released


class RecipientStatus(StrEnum):
    """A recipient's state in the spool."""

    PENDING = "pending"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


class DeliveryStatus(StrEnum):
    """What one delivery attempt did for one recipient (logs' ``status=`` and metrics)."""

    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    HELD = "held"


class AttemptEnd(StrEnum):
    """Where a message is after :func:`gateway.queue.store.finish_attempt`: gone from the
    queue (``removed``: nothing pending; ``gone``: an operator deleted it meanwhile) or in a
    state again."""

    REMOVED = "removed"
    GONE = "gone"
    DEFERRED = "deferred"
    HELD = "held"


@dataclass
class Recipient:
    address: str
    position: int = 0
    status: RecipientStatus = RecipientStatus.PENDING
    last_reply: str | None = None
    remote_mta: str | None = None


@dataclass
class QueuedMessage:
    id: str
    sender: str
    recipients: list[Recipient]
    data: bytes
    route: Route = Route.DIRECT
    state: MessageState = MessageState.ACTIVE
    hold_reason: HoldReason | None = None
    kind: MessageKind = MessageKind.MAIL
    created_at: float = 0.0
    next_attempt: float = 0.0
    attempts: int = 0
    last_attempt: float | None = None
    client_ip: str | None = None
    helo: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    stored_size: int = 0  # the size column (listings load no data)
    tenant: str | None = None  # the customer that sent it (None: untenanted or older spool)

    @property
    def size_on_disk(self) -> int:
        return len(self.data) or self.stored_size

    @property
    def destination(self) -> str:
        """The spool's destination column: the first recipient's domain, lower case."""
        first = min(self.recipients, key=lambda r: r.position, default=None)
        return first.address.rpartition("@")[2].lower() if first else ""

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == RecipientStatus.PENDING]


@dataclass(frozen=True)
class DueMessage:
    """A message the poll found due: what the scheduler needs before it loads it."""

    queue_id: str
    destination: str
    size: int  # of its data, to reserve memory for before loading
    owner: str | None = None  # the process it is active for, if it is active


@dataclass(frozen=True)
class NewMessage:
    """A message to insert (an NDR queued together with the result that caused it)."""

    sender: str
    recipients: Sequence[str]
    data: bytes
    route: Route = Route.DIRECT
    state: MessageState = MessageState.ACTIVE
    kind: MessageKind = MessageKind.MAIL
    hold_reason: HoldReason | None = None
    client_ip: str | None = None
    helo: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    tenant: str | None = None


@dataclass(frozen=True)
class RecipientUpdate:
    position: int
    status: RecipientStatus  # PENDING: only the reply is recorded
    reply: str | None = None
    remote_mta: str | None = None


@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt found, written in one operation (atomic with its NDR, so a
    crash never gives two NDRs for one failure).

    ``next_state`` is what the message becomes if recipients remain pending: ``deferred`` or
    ``held`` (with ``hold_reason``).  An operator's hold or delete made during the attempt wins.
    """

    queue_id: str
    updates: Sequence[RecipientUpdate]
    next_state: MessageState = MessageState.DEFERRED
    next_attempt: float = 0.0
    hold_reason: HoldReason | None = None
    ndr: NewMessage | None = None
    complete: bool = False  # every recipient is done (delivered or bounced): remove it


@dataclass(frozen=True)
class AttemptOutcome:
    """What :meth:`Spool.finish_attempt` did (see :class:`AttemptEnd`)."""

    state: AttemptEnd
    ndr_id: str | None = None
