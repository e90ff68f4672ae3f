"""Route rule (DATA stage, last): always decides where an accepted message leaves from.

Good gateway: spam (``ctx.facts["spam"]["is_spam"]``) is rerouted to the bad gateway, anything
else is delivered directly from this gateway.  Bad gateway: everything it accepted is delivered
directly from its own address (it only receives what good gateways rerouted).
"""

from __future__ import annotations

from gateway.policy.chain import Action, MessageContext, RuleResult, Stage


class RouteRule:
    name = "route"
    stage = Stage.DATA

    def __init__(self, role: str) -> None:
        self.role = role

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        verdict = ctx.facts.get("spam")
        is_spam = bool(verdict and verdict.get("is_spam"))
        if self.role == "bad":
            what = "spam" if is_spam else "mail"
            return RuleResult(
                self.name, f"bad gateway: {what} delivered directly from here", Action.ACCEPT
            )
        if is_spam:
            return RuleResult(self.name, "spam: rerouted to the bad gateway", Action.REROUTE)
        return RuleResult(
            self.name, "not spam: delivered directly from this gateway", Action.ACCEPT
        )
