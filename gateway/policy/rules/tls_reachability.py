"""TLS reachability (RCPT stage): refuse a recipient in the session when its mail could not go.

Only where a forced-TLS rule with ``on_failure = "reject"`` applies (and
``tls_policy.session_probe`` is on).  The answer comes from what the relay knows
(:class:`~gateway.tls.reachability.ReachabilityCache`: recent deliveries and probes, shared by
the workers), else from a live probe bounded by ``tls_policy.session_probe_timeout``
(:class:`~gateway.delivery.probe.SessionProber`: connect, EHLO, STARTTLS, verify, QUIT):

- the destination gives the TLS: no verdict (the next rules decide; TLS failing later at
  delivery still bounces with an NDR, as before);
- it cannot (no STARTTLS, a failed handshake or verification on every MX that answered):
  ``550 5.7.10`` with the reason;
- the probe timed out, the DNS failed, no MX answered: ``450 4.7.10`` (the client retries).

One probe per destination at a time in the whole relay (a lease), remembered answers, and a
budget of ``tls_policy.session_probe_limit`` probes per sender domain and minute: over it the
recipient is accepted without a probe (delivery still never sends it in the clear).  See the
multi-tenant notes in :mod:`gateway.tls.reachability`.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.delivery.probe import ProbeResult, SessionProber
from gateway.log import event
from gateway.policy.chain import Action, MessageContext, Reply, RuleResult, Stage
from gateway.tls.policy import TlsPolicy, TlsRequirement
from gateway.tls.reachability import Answer, ReachabilityCache

log = logging.getLogger("smg.tls")

WAIT_STEP = 0.05  # how often a session waiting for another worker's probe looks for its answer


class TlsReachabilityRule:
    name = "tls_reachability"
    stage = Stage.RCPT

    def __init__(self, tls_policy: TlsPolicy, prober: SessionProber) -> None:
        self.tls_policy = tls_policy
        self.prober = prober
        self.section = tls_policy.config.tls_policy
        # probes this process runs now, per (domain, level): sessions here share them
        self._running: dict[tuple[str, str], asyncio.Task[ProbeResult]] = {}

    @property
    def cache(self) -> ReachabilityCache:
        return self.tls_policy.reachability

    async def evaluate(self, ctx: MessageContext) -> RuleResult:
        if not ctx.rcpt_tos:
            return RuleResult(self.name, "no recipient to check")
        domain = ctx.rcpt_tos[-1].rpartition("@")[2].strip(">").lower()
        rule = self.tls_policy.rule_for(ctx.sender_domain, domain)
        if rule is None or rule.on_failure != "reject":
            return RuleResult(self.name, f"no forced-TLS reject rule for {domain}")
        requirement = TlsRequirement(rule.level, rule.on_failure, rule.name, (),
                                     self.tls_policy.ca_bundle)  # fmt: skip
        answer = self.cache.answer(domain, rule.level)
        if answer is None:
            answer = await self._probe(ctx.sender_domain, domain, requirement)
            if answer is None:
                who = ctx.sender_domain or "<>"
                why = f"probe budget of {who} spent; checked at delivery"
                return RuleResult(self.name, f"{rule.level} TLS to {domain}: {why}")
        return self._verdict(answer, domain, rule.name)

    def _verdict(self, answer: Answer, domain: str, rule_name: str) -> RuleResult:
        details = {"rule": rule_name, "level": answer.level, "source": answer.source,
                   "reason": answer.reason}  # fmt: skip
        if answer.ok:
            return RuleResult(self.name, f"{answer.level} TLS to {domain}: {answer.reason} "
                              f"({answer.source})", details=details)  # fmt: skip
        detail = answer.reason if len(answer.reason) <= 200 else answer.reason[:197] + "..."
        if answer.temporary:
            text = (f"TLS is required for mail to {domain} and it could not be checked now "
                    f"({detail}); try again later")  # fmt: skip
            reply, action = Reply(450, "4.7.10", text), Action.TEMPFAIL
        else:
            text = (f"TLS is required for mail to {domain} and no TLS connection to it can be "
                    f"established ({detail}); not accepted")  # fmt: skip
            reply, action = Reply(550, "5.7.10", text), Action.REJECT
        return RuleResult(self.name, f"{rule_name}: {answer.reason}", action, reply,
                          details=details)  # fmt: skip

    async def _probe(
        self, sender_domain: str, domain: str, requirement: TlsRequirement
    ) -> Answer | None:
        """Our own probe, or the answer of the one another session (or worker) runs."""
        key = (domain, requirement.level)
        running = self._running.get(key)
        if running is None:
            timeout = self.section.session_probe_timeout
            if not self.cache.take_lease(domain, requirement.level, timeout + 5):
                return await self._wait_for_other(domain, requirement.level, timeout + 5)
            if not self.cache.spend(sender_domain, self.section.session_probe_limit):
                self.cache.release_lease(domain, requirement.level)
                event(log, "tls_probe_budget", sender_domain=sender_domain or "<>",
                      domain=domain, limit=self.section.session_probe_limit)  # fmt: skip
                return None
            running = asyncio.ensure_future(self._run(domain, requirement, timeout))
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        # a session that ends (shield) does not cancel the probe the others wait for
        return _from_result(domain, requirement.level, await asyncio.shield(running))

    async def _run(self, domain: str, requirement: TlsRequirement, timeout: float) -> ProbeResult:
        try:
            result = await self.prober.probe(domain, requirement, timeout)
            memory = self.section.session_probe_memory
            self.cache.record(domain, requirement.level, result.ok, result.reason, "probe",
                              memory, temporary=result.temporary)  # fmt: skip
            event(log, "tls_probe", domain=domain, tls_level=requirement.level,
                  result="ok" if result.ok else "temporary" if result.temporary else "fail",
                  relay=result.relay or "none", seconds=f"{result.seconds:.3f}",
                  reason=result.reason)  # fmt: skip
            return result
        finally:
            self.cache.release_lease(domain, requirement.level)

    async def _wait_for_other(self, domain: str, level: str, limit: float) -> Answer:
        """Another worker probes this destination: wait for its answer, within ``limit``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while loop.time() < deadline:
            await asyncio.sleep(WAIT_STEP)
            answer = self.cache.answer(domain, level)
            if answer is not None:
                return answer
        reason = f"a TLS probe of {domain} did not finish within {limit:g}s"
        return Answer(domain, level, False, True, reason, "probe", loop.time())


def _from_result(domain: str, level: str, result: ProbeResult) -> Answer:
    return Answer(domain, level, result.ok, result.temporary, result.reason, "probe", 0.0)
