"""The types every rule speaks, and the chain that runs them."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Action(enum.StrEnum):
    ACCEPT = "accept"  # deliver directly from this gateway
    REROUTE = "reroute"  # relay to the bad gateway (spam)
    HOLD = "hold"  # keep in the queue, held, until an operator acts
    REJECT = "reject"  # refuse in the SMTP session with the rule's reply
    TEMPFAIL = "tempfail"  # refuse for now (4xx): a check could not be made


class Stage(enum.StrEnum):
    MAIL = "mail"  # at MAIL FROM: the envelope sender is known
    RCPT = "rcpt"  # at each RCPT TO
    DATA = "data"  # at the end of DATA: the whole message is known


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: ``Reply(550, "5.1.8", "Sender Domain must resolve")``."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


@dataclass
class RuleResult:
    """What one rule found.  ``action`` None means: nothing to decide, go on."""

    rule: str
    summary: str
    action: Action | None = None
    reply: Reply | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class MessageContext:
    """One message as the policy sees it, growing as the SMTP session goes on."""

    client_ip: str
    helo: str = ""
    mail_from: str = ""  # "" is the null sender <>
    rcpt_tos: list[str] = field(default_factory=list)
    data: bytes = b""
    tls: bool = False
    queue_id: str = ""
    tenant: str | None = None  # the customer sending (issue 11); None: untenanted
    # Facts rules leave for later rules (e.g. "spam" -> SpamVerdict, "virus" -> name).
    facts: dict[str, Any] = field(default_factory=dict)
    # Headers to prepend and header names to remove before the message is queued.
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: set[str] = field(default_factory=set)

    @property
    def sender_domain(self) -> str:
        return self.mail_from.rpartition("@")[2].lower() if "@" in self.mail_from else ""


class Rule(Protocol):
    name: str
    stage: Stage

    async def evaluate(self, ctx: MessageContext) -> RuleResult: ...


@dataclass
class Decision:
    action: Action
    reply: Reply | None
    results: list[RuleResult]

    @property
    def decided_by(self) -> str:
        return self.results[-1].rule if self.results else ""


_FINAL = {Action.REJECT, Action.TEMPFAIL, Action.HOLD, Action.ACCEPT, Action.REROUTE}


class Chain:
    """Runs the rules of one stage in order; the first rule with an action decides."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)

    def for_stage(self, stage: Stage) -> list[Rule]:
        return [rule for rule in self.rules if rule.stage == stage]

    async def run(self, stage: Stage, ctx: MessageContext) -> Decision:
        results: list[RuleResult] = []
        for rule in self.for_stage(stage):
            result = await rule.evaluate(ctx)
            results.append(result)
            if result.action in _FINAL:
                return Decision(result.action, result.reply, results)
        return Decision(Action.ACCEPT, None, results)
