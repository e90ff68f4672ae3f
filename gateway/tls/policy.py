"""Which TLS a delivery needs: forced-TLS rules, then MTA-STS, else opportunistic STARTTLS.

The service keys forced TLS on the sender domain and the recipient domain together; the most
specific rule wins (:mod:`gateway.tls.rules`).

Delivery (``gateway.delivery``) asks :meth:`TlsPolicy.requirement` per (sender domain,
recipient domain) and enforces the :class:`TlsRequirement` it gets: never cleartext under
``encrypt``/``verify``, next MX on a TLS failure, then hold or reject.  It records TLS failures
in :attr:`TlsPolicy.failures`, which the intake's RCPT rule (``tls_known_failure``) reads to
refuse a recipient at once where a ``reject`` rule applies and TLS to it just failed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from gateway.dns import Resolver
from gateway.domains import normalize_domain
from gateway.queue.spool import resolve_path
from gateway.tls.dane import DaneResolver, Tlsa
from gateway.tls.failures import TlsFailureCache
from gateway.tls.levels import DANE, OPPORTUNISTIC, REQUIRES_TLS, VERIFY
from gateway.tls.mta_sts import MtaSts, MtaStsPolicy, StateFile, mx_matches
from gateway.tls.reachability import STATE_FILE as REACHABILITY_STATE
from gateway.tls.reachability import ReachabilityCache
from gateway.tls.rules import CompiledRule, compile_rules
from gateway.tls.tlsrpt import STATE_FILE as TLSRPT_STATE
from gateway.tls.tlsrpt import TlsRptCounts

FAILURES_STATE = "tls-failures.json"  # in the spool directory, shared by the workers
MTA_STS_STATE = "mta-sts.json"


@dataclass(frozen=True)
class TlsRequirement:
    """What one delivery needs (docs/architecture.md, "The contracts between rooms").

    ``level``: ``opportunistic`` (STARTTLS when offered, any certificate, cleartext otherwise),
    ``encrypt`` (STARTTLS with TLS >= 1.2 required, any certificate) or ``verify`` (also a chain
    valid against ``ca_bundle`` and a certificate name matching the MX host name).
    ``on_failure``: ``hold`` or ``reject`` when no MX meets the level (None when opportunistic).
    ``mx_patterns``: MTA-STS ``mx`` patterns; an MX matching none of them is not used.
    ``testing``: MTA-STS ``testing`` mode: delivered opportunistically, and what ``enforce``
    would have refused is logged (``mx_patterns`` are then for the log only).
    """

    level: str = OPPORTUNISTIC
    on_failure: str | None = None
    source: str = "default"
    mx_patterns: tuple[str, ...] = ()
    ca_bundle: Path | None = None
    testing: bool = False
    # level dane: the MX host's usable TLSA records (gateway.tls.dane); set per host
    tlsa: tuple[Tlsa, ...] = ()

    @property
    def requires_tls(self) -> bool:
        """True when cleartext is forbidden (encrypt, verify or dane)."""
        return self.level in REQUIRES_TLS

    def mx_listed(self, host: str) -> bool:
        """Does an MTA-STS pattern name this MX (True when there are no patterns)?"""
        return not self.mx_patterns or any(mx_matches(p, host) for p in self.mx_patterns)

    def mx_allowed(self, host: str) -> bool:
        """May delivery use this MX at all?  Only enforced MTA-STS policies exclude MX hosts."""
        return self.testing or self.mx_listed(host)

    def ssl_context(self) -> ssl.SSLContext:
        """The client context for STARTTLS under this requirement.

        Pass the MX host NAME (not its address) as ``server_hostname``: under ``verify`` the
        certificate must name it.  Under opportunistic/encrypt the certificate is not checked
        during the handshake; :func:`describe_tls` reports afterwards whether it would verify.
        """
        if self.level == VERIFY:
            ctx = ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.requires_tls:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def describe(self) -> str:
        text = f"{self.level}"
        if self.on_failure:
            text += f", on failure {self.on_failure}"
        if self.mx_patterns:
            text += f", mx {' '.join(self.mx_patterns)}"
        if self.testing:
            text += " (MTA-STS testing: not enforced)"
        if self.tlsa:
            text += f", {len(self.tlsa)} TLSA record(s)"
        return f"{text} ({self.source})"


def requirement_for_mta_sts(policy: MtaStsPolicy, ca_bundle: Path) -> TlsRequirement:
    """RFC 8461: enforce -> verified TLS to a listed MX, held on failure; testing -> logged."""
    source = f"mta-sts {policy.mode} id={policy.policy_id}"
    if policy.mode == "enforce":
        return TlsRequirement(VERIFY, "hold", source, tuple(policy.mx), ca_bundle)
    if policy.mode == "testing":
        return TlsRequirement(OPPORTUNISTIC, None, source, tuple(policy.mx), ca_bundle, True)
    return TlsRequirement(OPPORTUNISTIC, None, source, (), ca_bundle)


class TlsPolicy:
    """``await policy.requirement(sender_domain, recipient_domain) -> TlsRequirement``."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver | None,
        mta_sts: MtaSts | None = None,
        failures: TlsFailureCache | None = None,
        state_dir: Path | None = None,
        shared_state: bool = False,
    ) -> None:
        """``shared_state`` (the relay sets it): keep the failure memory and the MTA-STS cache
        in the spool directory (or ``state_dir``), shared between worker processes and kept
        across restarts.  Tools (``smg tls probe``, ``smg explain``) keep theirs in memory."""
        if shared_state and state_dir is None:
            state_dir = resolve_path(config.gateway.spool).parent
        self.config = config
        # The customers' rules (each only for senders it owns: config checks) join the fleet's.
        tenant_rules = [rule for tenant in config.tenants for rule in tenant.tls_rules]
        self.rules = compile_rules([*config.tls_policy.rules, *tenant_rules])
        self.ca_bundle = config.tls_policy.ca_bundle
        if mta_sts is None and config.mta_sts.enabled and resolver is not None:
            state = StateFile(state_dir / MTA_STS_STATE) if state_dir else None
            mta_sts = MtaSts(config.mta_sts, resolver, state=state)
        self.mta_sts = mta_sts if config.mta_sts.enabled else None
        ttl = config.tls_policy.failure_memory
        state = StateFile(state_dir / FAILURES_STATE) if state_dir else None
        self.failures = failures or TlsFailureCache(ttl, state=state)
        # DANE lookups (DO bit, AD trusted): for rules of level dane, and by default where
        # secure TLSA records exist (tls_policy.dane)
        uses_dane = config.tls_policy.dane or any(r.level == DANE for r in self.rules)
        self.dane = DaneResolver(resolver) if uses_dane and resolver is not None else None
        # TLS sessions counted for TLS reports (RFC 8460: smg tls report)
        self.tlsrpt = TlsRptCounts(state_dir / TLSRPT_STATE if state_dir else None)
        # what deliveries and in-session probes learnt (the intake's tls_reachability rule)
        self.reachability = ReachabilityCache(state_dir / REACHABILITY_STATE if state_dir else None)

    def carry_over(self, previous: TlsPolicy) -> None:
        """After a config reload: keep what the relay learnt (recent TLS failures, cached
        MTA-STS policies), so a reload neither forgets a failure nor opens the window in which
        a blocked policy refresh would downgrade a domain."""
        previous.failures.ttl = self.failures.ttl
        self.failures = previous.failures
        self.reachability.close()
        self.reachability = previous.reachability
        self.tlsrpt.close()
        self.tlsrpt = previous.tlsrpt
        if self.mta_sts is not None and previous.mta_sts is not None:
            self.mta_sts.adopt(previous.mta_sts)

    def rule_for(self, sender_domain: str, recipient_domain: str) -> CompiledRule | None:
        """The most specific forced-TLS rule for this pair, or None."""
        sender, recipient = normalize_domain(sender_domain), normalize_domain(recipient_domain)
        for rule in self.rules:  # sorted most specific first
            if rule.matches(sender, recipient):
                return rule
        return None

    async def requirement(self, sender_domain: str, recipient_domain: str) -> TlsRequirement:
        rule = self.rule_for(sender_domain, recipient_domain)
        if rule is not None:
            return TlsRequirement(rule.level, rule.on_failure, rule.name, (), self.ca_bundle)
        if self.mta_sts is not None:
            policy = await self.mta_sts.policy(normalize_domain(recipient_domain))
            if policy is not None and policy.mode != "none":
                return requirement_for_mta_sts(policy, self.ca_bundle)
        return TlsRequirement(OPPORTUNISTIC, None, "default", (), self.ca_bundle)
