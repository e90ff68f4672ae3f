"""Virus rule (DATA stage, first): every message is scanned by clamd before the 250.

Infected: ``554 5.7.1 Virus found: <name>``; the cleanup step then sends the sender an
information NDR (``gateway.policy.cleanup.Cleanup.after_reject``).  No verdict (clamd down, too
slow, or the message larger than clamd's ``StreamMaxLength``): ``451 4.7.0``, so a message is
never accepted unscanned.
"""

from __future__ import annotations

from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage
from gateway.scanners.clamd import ClamdClient, ClamdError, ClamdSizeLimit


class VirusRule:
    name = "virus"
    stage = Stage.DATA

    def __init__(self, clamd: ClamdClient) -> None:
        self.clamd = clamd

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        try:
            result = await self.clamd.scan(ctx.data)
        except ClamdSizeLimit as exc:
            return _tempfail(f"not scanned, larger than clamd's StreamMaxLength: {exc}")
        except ClamdError as exc:
            return _tempfail(f"not scanned, clamd unavailable: {exc}")
        if result.virus is None:
            return RuleResult(self.name, "clean")
        ctx.facts["virus"] = result.virus
        return RuleResult(
            self.name,
            f"infected: {result.virus}",
            Action.REJECT,
            Reply(554, "5.7.1", f"Virus found: {result.virus}"),
            details={"virus": result.virus},
        )


def _tempfail(why: str) -> RuleResult:
    return RuleResult(
        VirusRule.name,
        why,
        Action.TEMPFAIL,
        Reply(451, "4.7.0", "Virus scan temporarily unavailable, try again later"),
        details={"error": why},
    )
