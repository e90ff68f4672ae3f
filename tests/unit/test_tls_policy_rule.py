"""The RCPT rule tls_known_failure: 550 5.7.10 only for reject rules with a recent failure."""

from __future__ import annotations

from gateway.config import parse_config
from gateway.policy.chain import Action, MessageContext
from gateway.policy.rules.tls_known_failure import TlsKnownFailureRule
from gateway.tls.policy import TlsPolicy


def policy() -> TlsPolicy:
    rules = [
        {
            "sender": "bank.de",
            "recipient": "partner.net",
            "level": "verify",
            "on_failure": "reject",
        },
        {"sender": "*", "recipient": "partner.net", "level": "encrypt", "on_failure": "hold"},
    ]
    config = parse_config(
        {
            "gateway": {"hostname": "gw.example.net", "role": "bad"},
            "tls_policy": {"rules": rules},
            "mta_sts": {"enabled": False},
        }
    )
    return TlsPolicy(config, resolver=None)


def ctx(sender: str, *rcpts: str) -> MessageContext:
    return MessageContext(client_ip="127.0.0.1", mail_from=sender, rcpt_tos=list(rcpts))


async def test_refuses_only_under_a_reject_rule_after_a_recent_failure() -> None:
    tls = policy()
    rule = TlsKnownFailureRule(tls)
    assert (await rule.evaluate(ctx("a@bank.de", "b@partner.net"))).action is None
    tls.failures.record_failure("partner.net", "mx1.partner.net: no STARTTLS", "encrypt")
    result = await rule.evaluate(ctx("a@bank.de", "x@other.org", "b@Partner.NET"))
    assert result.action is Action.REJECT and result.reply is not None
    assert (result.reply.code, result.reply.status) == (550, "5.7.10")
    assert "partner.net" in result.reply.text and "no STARTTLS" in result.reply.text
    # a hold rule (any other sender) keeps accepting: the mail waits in the queue
    assert (await rule.evaluate(ctx("a@shop.org", "b@partner.net"))).action is None
    # the recipient being checked is the last one
    assert (await rule.evaluate(ctx("a@bank.de", "b@partner.net", "c@other.org"))).action is None
    tls.failures.record_success("partner.net")
    assert (await rule.evaluate(ctx("a@bank.de", "b@partner.net"))).action is None


async def test_no_recipient_is_no_decision() -> None:
    assert (await TlsKnownFailureRule(policy()).evaluate(ctx("a@bank.de"))).action is None
