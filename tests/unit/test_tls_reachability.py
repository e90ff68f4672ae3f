"""The RCPT rule tls_reachability and its shared cache: answers, leases, budgets (issue 14)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.config import parse_config
from gateway.delivery.probe import ProbeResult
from gateway.policy.chain import Action, MessageContext
from gateway.policy.rules.tls_reachability import TlsReachabilityRule
from gateway.tls.policy import TlsPolicy, TlsRequirement
from gateway.tls.reachability import ReachabilityCache


class FakeProber:
    def __init__(self, result: ProbeResult, delay: float = 0.0) -> None:
        self.result, self.delay, self.calls = result, delay, []

    async def probe(self, domain: str, requirement: TlsRequirement, timeout: float) -> ProbeResult:
        self.calls.append((domain, requirement.level))
        await asyncio.sleep(self.delay)
        return self.result


def policy(tmp_path: Path | None = None, **section: object) -> TlsPolicy:
    rules = [
        {
            "sender": "bank.de",
            "recipient": "partner.net",
            "level": "verify",
            "on_failure": "reject",
        },
        {"sender": "*", "recipient": "partner.net", "level": "encrypt", "on_failure": "hold"},
        {"sender": "shop.de", "recipient": "*", "level": "encrypt", "on_failure": "reject"},
    ]
    config = parse_config(
        {
            "gateway": {"hostname": "gw.example.net", "role": "bad"},
            "tls_policy": {"rules": rules, **section},
            "mta_sts": {"enabled": False},
        }
    )
    return TlsPolicy(config, resolver=None, state_dir=tmp_path)


def ctx(sender: str, *rcpts: str) -> MessageContext:
    return MessageContext(client_ip="127.0.0.1", mail_from=sender, rcpt_tos=list(rcpts))


OK = ProbeResult(True, False, "verify TLS works", "mx.partner.net[192.0.2.1]:25")
NO_TLS = ProbeResult(False, False, "mx.partner.net[198.51.100.7]:25: STARTTLS not offered")
SLOW = ProbeResult(False, True, "TLS probe of partner.net timed out after 10s")


async def test_only_reject_rules_are_checked() -> None:
    prober = FakeProber(NO_TLS)
    rule = TlsReachabilityRule(policy(), prober)  # type: ignore[arg-type]
    assert (await rule.evaluate(ctx("a@other.org", "b@partner.net"))).action is None  # hold
    assert (await rule.evaluate(ctx("a@other.org", "b@nowhere.org"))).action is None  # no rule
    assert prober.calls == []


async def test_cannot_gives_550_and_is_remembered() -> None:
    prober = FakeProber(NO_TLS)
    rule = TlsReachabilityRule(policy(), prober)  # type: ignore[arg-type]
    first = await rule.evaluate(ctx("a@bank.de", "b@Partner.NET"))
    assert first.action is Action.REJECT and first.reply is not None
    assert (first.reply.code, first.reply.status) == (550, "5.7.10")
    assert "STARTTLS not offered" in first.reply.text and "partner.net" in first.reply.text
    second = await rule.evaluate(ctx("a@bank.de", "c@partner.net"))
    assert second.action is Action.REJECT and len(prober.calls) == 1  # from the cache


async def test_timeout_gives_450_and_ok_passes() -> None:
    rule = TlsReachabilityRule(policy(), FakeProber(SLOW))  # type: ignore[arg-type]
    result = await rule.evaluate(ctx("a@bank.de", "b@partner.net"))
    assert result.action is Action.TEMPFAIL and result.reply is not None
    assert (result.reply.code, result.reply.status) == (450, "4.7.10")
    rule = TlsReachabilityRule(policy(), FakeProber(OK))  # type: ignore[arg-type]
    assert (await rule.evaluate(ctx("a@bank.de", "b@partner.net"))).action is None


async def test_a_flood_of_rcpts_runs_one_probe(tmp_path) -> None:
    prober = FakeProber(SLOW, delay=0.2)
    rule = TlsReachabilityRule(policy(tmp_path), prober)  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(rule.evaluate(ctx("a@bank.de", f"u{i}@partner.net")) for i in range(50))
    )
    assert len(prober.calls) == 1
    assert all(r.reply is not None and r.reply.code == 450 for r in results)


async def test_workers_share_the_lease_and_the_answer(tmp_path) -> None:
    """Two processes = two caches on one file: the second waits for the first's answer."""
    first = TlsReachabilityRule(policy(tmp_path), FakeProber(NO_TLS, delay=0.2))  # type: ignore[arg-type]
    other = FakeProber(OK)
    second = TlsReachabilityRule(policy(tmp_path), other)  # type: ignore[arg-type]
    second.cache.holder = "other-worker"
    a, b = await asyncio.gather(
        first.evaluate(ctx("a@bank.de", "b@partner.net")),
        second.evaluate(ctx("a@bank.de", "c@partner.net")),
    )
    assert a.action is Action.REJECT and b.action is Action.REJECT
    assert other.calls == []


async def test_budget_per_sender_domain_then_accepted_unprobed() -> None:
    prober = FakeProber(OK)
    rule = TlsReachabilityRule(policy(session_probe_limit=2), prober)  # type: ignore[arg-type]
    for i in range(4):
        await rule.evaluate(ctx("a@shop.de", f"b@dest{i}.org"))
    assert len(prober.calls) == 2  # two probes this minute; the others go unprobed
    result = await rule.evaluate(ctx("a@shop.de", "b@dest9.org"))
    assert result.action is None and "budget" in result.summary
    # another customer's budget is its own
    assert (await rule.evaluate(ctx("a@bank.de", "b@partner.net"))).action is None
    assert len(prober.calls) == 3


def test_cache_levels_and_contradictions() -> None:
    now = [1000.0]
    cache = ReachabilityCache(clock=lambda: now[0])
    cache.record("p.net", "encrypt", False, "no STARTTLS", "delivery", 60)
    assert cache.answer("p.net", "verify").ok is False  # no STARTTLS: no verify either
    cache.record("p.net", "verify", True, "delivered", "delivery", 60)
    assert cache.answer("p.net", "encrypt").ok is True  # the success voided the failure
    assert cache.answer("p.net", "verify").ok is True
    cache.record("p.net", "verify", False, "expired", "probe", 60)
    assert cache.answer("p.net", "verify").ok is False
    assert cache.answer("p.net", "encrypt") is None  # a verify failure says nothing of encrypt
    cache.record("q.net", "encrypt", False, "timeout", "probe", 600, temporary=True)
    now[0] += 31  # temporary answers last 30 s at most
    assert cache.answer("q.net", "encrypt") is None
    now[0] += 60
    assert cache.answer("p.net", "verify") is None  # expired
    cache.record("r.net", "encrypt", True, "x", "probe", 0)  # memory 0: not remembered
    assert cache.answer("r.net", "encrypt") is None


def test_delivery_failure_and_success_reach_the_cache(tmp_path) -> None:
    tls = policy(tmp_path)
    tls.reachability.record("partner.net", "verify", True, "delivered", "delivery", 600)
    again = policy(tmp_path)  # another worker opens the same file
    assert again.reachability.answer("partner.net", "verify").source == "delivery"
