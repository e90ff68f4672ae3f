"""Known TLS failure (RCPT stage): refuse a recipient at once when its mail could only bounce.

Where a forced-TLS rule with ``on_failure = "reject"`` applies to (sender domain, recipient
domain) and delivery to that recipient domain failed to get TLS at the rule's level (or a
weaker one: no STARTTLS fails ``verify`` too) within ``tls_policy.failure_memory`` (delivery
records this in ``TlsPolicy.failures``), accepting the
message would only produce an NDR a moment later.  The recipient is refused in the session
instead, with ``550 5.7.10`` (RFC 5248: encryption needed), so the sender's MTA tells the sender
directly.  ``hold`` rules and MTA-STS never refuse here: their mail waits in the queue.
"""

from __future__ import annotations

from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage
from gateway.tls.policy import TlsPolicy


class TlsKnownFailureRule:
    name = "tls_known_failure"
    stage = Stage.RCPT

    def __init__(self, tls_policy: TlsPolicy) -> None:
        self.tls_policy = tls_policy

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        if not ctx.rcpt_tos:
            return RuleResult(self.name, "no recipient to check")
        recipient = ctx.rcpt_tos[-1]  # the intake appends the recipient being checked
        domain = recipient.rpartition("@")[2].strip(">").lower()
        rule = self.tls_policy.rule_for(ctx.sender_domain, domain)
        if rule is None or rule.on_failure != "reject":
            return RuleResult(self.name, f"no forced-TLS reject rule for {domain}")
        failure = self.tls_policy.failures.recent_failure(domain, rule.level)
        if failure is None:
            return RuleResult(self.name, f"{rule.level} TLS to {domain}: no recent failure")
        # An SMTP reply line has at most 512 octets: keep the far end's detail short.
        detail = failure if len(failure) <= 200 else failure[:197] + "..."
        text = (
            f"TLS is required for mail to {domain} and no TLS connection to it could be "
            f"established recently ({detail}); not accepted"
        )
        return RuleResult(
            self.name,
            f"{rule.name}: {failure}",
            Action.REJECT,
            Reply(550, "5.7.10", text),
            details={"rule": rule.name, "level": rule.level, "failure": failure},
        )
