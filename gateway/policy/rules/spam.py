"""Spam rule (DATA stage, good gateways): ask rspamd, record the verdict, decide nothing.

Spam is never rejected: the verdict goes into ``ctx.facts["spam"]`` and the route rule reroutes
spam to the bad gateway.  A message counts as spam when rspamd's action is one of
``spam.spam_actions`` or its score reaches ``spam.spam_score``.  rspamd down or too slow:
``451 4.7.0`` (try again later), unless ``spam.fail_open`` lets the message through as ham.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from gateway.config import SpamSection
from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage
from gateway.scanners.rspamd import RspamdClient, RspamdError

# The verdict names at most this many symbols (the highest scores): enough to explain, short
# enough for one header line and an NDR paragraph.
MAX_SYMBOLS = 20


class SpamVerdict(TypedDict):
    """The spam verdict of one message, as it travels in ``ctx.facts["spam"]`` and in the
    spool's facts (a plain dict, so it is JSON as it stands)."""

    is_spam: bool
    score: float
    required: float  # the score from which this gateway treats mail as spam (spam_score)
    action: str  # rspamd's action: "no action", "add header", "reject", ...
    symbols: dict[str, float]  # rule name -> score, highest first
    source: str  # "rspamd", or "verdict header from <ip>" on the bad gateway
    tenant: NotRequired[str]  # the bad gateway: the customer the good gateway named


def classify(reply: dict[str, Any], section: SpamSection) -> SpamVerdict:
    """Map rspamd's checkv2 reply to a verdict through ``spam.spam_actions``/``spam_score``."""
    score = float(reply.get("score", 0.0))
    action = str(reply.get("action", "no action"))
    return SpamVerdict(
        is_spam=action in section.spam_actions or score >= section.spam_score,
        score=round(score, 2),
        required=round(section.spam_score, 2),
        action=action,
        # A pre-result (GTUBE, say) skips the other rules and reports its symbol with score 0:
        # then every symbol named is part of the reason.
        symbols=top_symbols(reply.get("symbols") or {}, keep_zero=bool(reply.get("is_skipped"))),
        source="rspamd",
    )


def top_symbols(symbols: dict[str, Any], keep_zero: bool = False) -> dict[str, float]:
    """rspamd's ``symbols`` -> {name: score} for the symbols that scored, highest first."""
    scored: list[tuple[str, float]] = []
    for name, info in symbols.items():
        score = float(info.get("score", 0.0)) if isinstance(info, dict) else 0.0
        if score != 0.0 or keep_zero:
            scored.append((str(name), round(score, 2)))
    scored.sort(key=lambda item: (-abs(item[1]), item[0]))
    return dict(scored[:MAX_SYMBOLS])


def describe(verdict: SpamVerdict) -> str:
    kind = "spam" if verdict["is_spam"] else "ham"
    rules = ", ".join(f"{k}({v:g})" for k, v in verdict["symbols"].items()) or "none"
    return (
        f"{kind}: score {verdict['score']:g} (rspamd action {verdict['action']!r}); rules: {rules}"
    )


class SpamRule:
    name = "spam"
    stage = Stage.DATA

    def __init__(self, rspamd: RspamdClient, section: SpamSection) -> None:
        self.rspamd = rspamd
        self.section = section

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        try:
            reply = await self.rspamd.check(
                ctx.data,
                ip=ctx.client_ip,
                helo=ctx.helo,
                mail_from=ctx.mail_from,
                rcpts=ctx.rcpt_tos,
                # Any non-empty User marks the message as authenticated: outbound mail.
                user=ctx.mail_from or "mailer-daemon",
                queue_id=ctx.queue_id,
            )
        except RspamdError as exc:
            return self._unavailable(str(exc))
        verdict = classify(reply, self.section)
        ctx.facts["spam"] = verdict
        return RuleResult(self.name, describe(verdict), details=dict(verdict))

    def _unavailable(self, why: str) -> RuleResult:
        if self.section.fail_open:
            return RuleResult(
                self.name, f"rspamd unavailable, passed unscanned (spam.fail_open): {why}"
            )
        return RuleResult(
            self.name,
            f"rspamd unavailable: {why}",
            Action.TEMPFAIL,
            Reply(451, "4.7.0", "Spam check temporarily unavailable, try again later"),
            details={"error": why},
        )
