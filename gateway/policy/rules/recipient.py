"""Recipient rule (RCPT stage): syntax, no relay tricks, and the recipient limit.

The recipient being checked is the last one of ``ctx.rcpt_tos`` (the intake appends it before
the RCPT stage runs and takes it out again when the stage refuses it).  Refused:

- malformed addresses, addresses without a domain, single-label domains: ``553 5.1.3``;
- the relay tricks that make another host relay further: source routes (``<@a,@b:u@c>``),
  the percent hack (``u%c@a``), UUCP bang paths (``c!u@a``), quoted local parts that hide an
  ``@`` or ``%``, address literals (``u@[198.51.100.1]``): ``550 5.7.1``;
- more than ``gateway.max_recipients`` recipients: ``452 4.5.3`` (RFC 5321 4.5.3.1.10: the
  client sends the rest in another transaction).
"""

from __future__ import annotations

from gateway.addresses import AddressError, parse_path
from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage


class RecipientRule:
    name = "recipient"
    stage = Stage.RCPT

    def __init__(self, max_recipients: int) -> None:
        self.max_recipients = max_recipients

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        if not ctx.rcpt_tos:
            return RuleResult(self.name, "no recipient to check")
        if len(ctx.rcpt_tos) > self.max_recipients:
            text = f"Too many recipients, at most {self.max_recipients} per message"
            return self._refuse(text, Reply(452, "4.5.3", text), Action.TEMPFAIL)
        address = ctx.rcpt_tos[-1]
        problem = recipient_problem(address)
        if problem is not None:
            return self._refuse(problem.text, problem)
        return RuleResult(self.name, f"recipient <{address}> is acceptable")

    def _refuse(self, summary: str, reply: Reply, action: Action = Action.REJECT) -> RuleResult:
        return RuleResult(self.name, summary, action, reply)


def recipient_problem(address: str) -> Reply | None:
    """The reply refusing ``address`` (the inside of ``<...>``), or None if it is fine."""
    if not address:
        return Reply(553, "5.1.3", "The null address <> is not a recipient")
    try:
        mailbox = parse_path(address)
    except AddressError as exc:
        return Reply(553, "5.1.3", f"Bad recipient address syntax: {exc}")
    if mailbox.route:
        return _trick(f"Source routes are not accepted; send to <{mailbox.address}> directly")
    local = mailbox.local_text
    if mailbox.quoted and ("@" in local or "%" in local):
        return _trick("A quoted local part containing '@' or '%' is not accepted")
    if "%" in local:
        return _trick("'%' in the local part is not accepted (percent-hack relaying)")
    if "!" in local:
        return _trick("'!' in the local part is not accepted (UUCP bang-path relaying)")
    if not mailbox.domain:
        return Reply(553, "5.1.3", "The recipient address must include a domain")
    if mailbox.is_address_literal:
        return _trick("Address literals are not accepted as recipient domains")
    if "." not in mailbox.domain.rstrip("."):
        return Reply(553, "5.1.3", f"The recipient domain {mailbox.domain} is not fully qualified")
    return None


def _trick(text: str) -> Reply:
    return Reply(550, "5.7.1", text)
