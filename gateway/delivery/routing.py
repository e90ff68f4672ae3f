"""Where a message goes, and the attempt over the addresses of its route.

Route ``direct``: per recipient domain the MX hosts in preference order (or the implicit MX);
a null MX bounces at once.  Route ``bad_gateway`` (spam on a good gateway): the
``routing.bad_gateways`` with TLS verified against ``routing.internal_ca``, spread over the list
(each message starts at the gateway its queue id hashes to, then the next ones in turn) and a
gateway that just failed tried last for ``BAD_GATEWAY_DOWN_SECONDS``; if none answers the
message stays deferred: it never goes direct.

TLS.  Under a :class:`TlsRequirement` of ``encrypt`` or ``verify`` nothing is ever sent in
cleartext: a missing STARTTLS, a failed handshake or a failed verification moves on to the
next MX; when none is left the recipients are held or bounced, as ``on_failure`` says.

Internal targets.  Only addresses that :class:`gateway.delivery.screen.Screen` lets through are
dialled: public ones (the bad gateways exempt), never the relay's own listener, and an MX written
as an address literal is not a host name.  A domain whose every host is refused bounces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
import zlib
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.config import Config
from gateway.delivery.client import Dialer, HostFailed, Target
from gateway.delivery.dane import dane_applies, host_requirement
from gateway.delivery.outcome import BOUNCED, DEFERRED, HELD, RcptOutcome, Rcpts, everyone
from gateway.delivery.pool import ConnectionPool
from gateway.delivery.screen import (
    LOOP,
    NOT_ROUTABLE,
    Refusal,
    Screen,
    address_literal,
    literal_refusal,
)
from gateway.dns import MailHosts, Resolver
from gateway.log import event
from gateway.queue.model import QueuedMessage
from gateway.tls.failures import TlsFailureCache
from gateway.tls.levels import DANE, VERIFY
from gateway.tls.policy import TlsPolicy, TlsRequirement
from gateway.tls.tlsrpt import result_type
from gateway.tls.verify import TlsOutcome

log = logging.getLogger("smg.delivery")

ROUTE_CACHE_SECONDS = 10  # MX and address answers reused this long at most (and never past TTL)
ROUTE_CACHE_SIZE = 10000
BAD_GATEWAY = "(bad gateway)"  # the "domain" of the bad-gateway route in failure records
# A bad gateway that failed (refused, timed out, TLS) goes to the end of the order this long:
# the others are tried first, so one gateway down costs no connect timeout per message; it is
# still tried when every other one fails, so a gateway back up drains the queue at once.
BAD_GATEWAY_DOWN_SECONDS = 60.0


class Router:
    """Looks routes up (answers kept a few seconds) and tries their addresses in order."""

    def __init__(
        self,
        config: Callable[[], Config],
        resolver: Resolver,
        tls_policy: TlsPolicy | None,
        pool: ConnectionPool,
        dialer: Dialer,
    ) -> None:
        self._config = config
        self.resolver = resolver
        self.tls_policy = tls_policy
        self.pool = pool
        self.dialer = dialer
        self._mail_hosts_cache: _Remembered[str, MailHosts] = _Remembered()
        self._targets_cache: _Remembered[tuple[str, int], list[Target]] = _Remembered()
        self._screen: tuple[Config, Screen] | None = None
        self.bad_gateways_down: dict[tuple[str, int], float] = {}  # -> monotonic time it ends

    def forget(self) -> None:
        """Drop remembered answers (a reload)."""
        self._mail_hosts_cache.clear()
        self._targets_cache.clear()

    def screen(self) -> Screen:
        """The address rules for the configuration in force (rebuilt after a reload)."""
        config = self._config()
        if self._screen is None or self._screen[0] is not config:
            self._screen = (config, Screen(self.resolver, config.gateway.listen))
        return self._screen[1]

    @property
    def _failures(self) -> TlsFailureCache | None:
        return self.tls_policy.failures if self.tls_policy is not None else None

    # -- the routes ---------------------------------------------------------------------------

    async def deliver_domain(
        self, message: QueuedMessage, domain: str, rcpts: Rcpts, payload: bytes
    ) -> list[RcptOutcome]:
        try:
            requirement = await self._requirement(message, domain)
        except Exception as exc:  # the policy could not be decided (MTA-STS fetch...): later
            return everyone(rcpts, DEFERRED, f"TLS policy lookup failed: {exc}", "4.7.5")
        hosts = await self._mail_hosts(domain)
        if hosts.null_mx:
            reason = f"domain {domain} accepts no mail (null MX, RFC 7505)"
            return everyone(rcpts, BOUNCED, reason, "5.1.10")
        if hosts.status == "nxdomain":
            reason = f"domain {domain} does not exist (DNS NXDOMAIN)"
            return everyone(rcpts, BOUNCED, reason, "5.1.2")
        if hosts.status != "ok" or not hosts.hosts:
            detail = f"{hosts.status} {hosts.rcode} {hosts.detail}".strip()
            return everyone(rcpts, DEFERRED, f"MX lookup for {domain} failed: {detail}", "4.4.3")
        names = [h for h in hosts.names if requirement.mx_allowed(h)]
        if requirement.testing:  # MTA-STS testing: say what enforce would have refused
            for host in hosts.names:
                if not requirement.mx_listed(host):
                    event(log, "mta_sts_testing", message.id, domain=domain, mx=host,
                          problem="MX not listed in the policy",
                          policy=requirement.source)  # fmt: skip
        if not names:
            reason = f"no MX host of {domain} is allowed by {requirement.source}"
            return self._tls_failed(domain, rcpts, requirement, reason)
        dane_resolver = self.tls_policy.dane if self.tls_policy is not None else None
        dane = await dane_applies(dane_resolver, domain, requirement)
        if requirement.level == DANE and not dane:
            reason = f"the MX records of {domain} are not DNSSEC-secure: no DANE"
            return self._tls_failed(domain, rcpts, requirement, reason)
        port = self._config().delivery.port
        refused = [literal_refusal(name, domain) for name in names if address_literal(name)]
        hosts_to_try = [(name, port) for name in names if not address_literal(name)]
        return await self._try_hosts(
            message, domain, rcpts, payload, requirement, hosts_to_try, refused, dane=dane
        )

    async def deliver_bad_gateway(
        self, message: QueuedMessage, rcpts: Rcpts, payload: bytes
    ) -> list[RcptOutcome]:
        routing = self._config().routing
        if not routing.bad_gateways:
            reason = "route bad_gateway but routing.bad_gateways is empty: kept in the queue"
            return everyone(rcpts, DEFERRED, reason, "4.3.5")
        # Verified TLS against the fleet's CA; a failure never falls back to direct delivery.
        requirement = TlsRequirement(VERIFY, None, "routing.bad_gateways", (), routing.internal_ca)
        order = self.bad_gateway_order(message.id, routing.bad_gateways)
        outcomes = await self._try_hosts(
            message, BAD_GATEWAY, rcpts, payload, requirement, order, gateway_route=True
        )
        for outcome in outcomes:
            if outcome.status == HELD:  # never held or bounced for TLS: stays deferred
                outcome.status = DEFERRED
        return outcomes

    def bad_gateway_order(
        self, queue_id: str, gateways: list[tuple[str, int]]
    ) -> list[tuple[str, int]]:
        """The bad gateways for this message: rotated to start at the one its queue id hashes
        to (the fleet's spam spread over all of them, a retry of one message stable), those
        that failed within BAD_GATEWAY_DOWN_SECONDS moved to the end."""
        if not gateways:
            return []
        start = zlib.crc32(queue_id.encode()) % len(gateways)
        rotated = gateways[start:] + gateways[:start]
        now = time.monotonic()
        down = {g for g, until in self.bad_gateways_down.items() if until > now}
        return [g for g in rotated if g not in down] + [g for g in rotated if g in down]

    def _gateway_failed(self, queue_id: str, host: str, port: int, reply: str) -> None:
        if self.bad_gateways_down.get((host, port), 0.0) <= time.monotonic():
            event(log, "bad_gateway_down", queue_id, relay=f"{host}:{port}", reason=reply,
                  seconds=int(BAD_GATEWAY_DOWN_SECONDS))  # fmt: skip
        self.bad_gateways_down[(host, port)] = time.monotonic() + BAD_GATEWAY_DOWN_SECONDS

    async def _requirement(self, message: QueuedMessage, domain: str) -> TlsRequirement:
        if self.tls_policy is None:
            return TlsRequirement()
        sender_domain = message.sender.rpartition("@")[2].lower() if message.sender else ""
        return await self.tls_policy.requirement(sender_domain, domain)

    async def _try_hosts(
        self,
        message: QueuedMessage,
        domain: str,
        rcpts: Rcpts,
        payload: bytes,
        requirement: TlsRequirement,
        hosts: list[tuple[str, int]],
        refused: list[Refusal] | None = None,
        gateway_route: bool = False,
        dane: bool = False,
    ) -> list[RcptOutcome]:
        """Try the hosts' addresses in order.  ``refused`` (hosts already ruled out) is given
        for the direct route only: there a domain whose every address is refused bounces; the
        bad-gateway route (our fleet: no public-address rule) only ever defers."""
        direct = refused is not None
        refused = list(refused or [])
        errors: list[str] = []
        tls_errors: list[str] = []
        last_relay = ""
        screen = self.screen()
        for host, port in hosts:
            host_req = requirement
            if dane and self.tls_policy is not None and self.tls_policy.dane is not None:
                found = await host_requirement(self.tls_policy.dane, host, requirement)
                host_req, problem, tls = found
                if problem:
                    (tls_errors if tls else errors).append(problem)
                    continue
            targets, problem = await self._targets(host, port, literal_ok=not direct)
            if problem:
                errors.append(problem)
            for target in targets:
                refusal = screen.refusal(
                    domain, target.host, target.ip, target.port, public_only=direct
                )
                if refusal is not None:
                    refused.append(refusal)
                    event(log, "delivery_refused", message.id, domain=domain,
                          relay=target.relay, reason=refusal.reason)  # fmt: skip
                    continue
                last_relay = target.relay
                try:
                    outcomes = await self.pool.deliver(
                        self.dialer, target, host_req, message, rcpts, payload
                    )
                except HostFailed as exc:
                    (tls_errors if exc.tls else errors).append(f"{target.relay}: {exc.reply}")
                    if exc.tls:
                        self._count_tls(domain, host_req, target, result_type(exc.reply))
                    if gateway_route:
                        self._gateway_failed(message.id, host, port, exc.reply)
                    continue
                if gateway_route:
                    self.bad_gateways_down.pop((host, port), None)
                if requirement.requires_tls and self._failures is not None:
                    self._failures.record_success(domain, requirement.level)
                    self._remember(domain, requirement, True, f"delivered via {target.relay}")
                if outcomes and outcomes[0].tls.encrypted:
                    self._count_tls(domain, host_req, target, "")
                if requirement.testing and outcomes:
                    _report_mta_sts_testing(message, domain, target, requirement, outcomes[0].tls)
                return outcomes
        if tls_errors:
            return self._tls_failed(domain, rcpts, requirement, "; ".join(tls_errors[-3:]))
        if refused and not errors and direct:  # nothing but internal targets: say so, at once
            return _bounce_refused(rcpts, refused)
        problems = errors[-3:] + [r.reason for r in refused][-3:]
        reason = "; ".join(problems) or "no host to deliver to"
        return [RcptOutcome(p, a, DEFERRED, reason, "4.4.1", relay=last_relay) for p, a in rcpts]

    def _tls_failed(
        self, domain: str, rcpts: Rcpts, requirement: TlsRequirement, detail: str
    ) -> list[RcptOutcome]:
        reason = f"no TLS connection could be established ({requirement.describe()}): {detail}"
        if self._failures is not None and domain != BAD_GATEWAY and requirement.requires_tls:
            self._failures.record_failure(domain, detail, requirement.level)  # intake's 5.7.10
            self._remember(domain, requirement, False, detail)
        if requirement.on_failure is None:  # opportunistic DANE failed: retried as usual
            return everyone(rcpts, DEFERRED, reason, "4.7.5")
        status = BOUNCED if requirement.on_failure == "reject" else HELD
        enhanced = "5.7.10" if status == BOUNCED else "4.7.10"
        return everyone(rcpts, status, reason, enhanced)

    def _count_tls(self, domain: str, req: TlsRequirement, target: Target, result: str) -> None:
        """One TLS session for the domain's TLS report (RFC 8460), success when ``result`` is
        empty."""
        if self.tls_policy is None or domain == BAD_GATEWAY:
            return
        policy = "tlsa" if req.level == DANE else "sts" if req.mx_patterns else "no-policy-found"
        source = self._config().gateway.source_address or ""
        self.tls_policy.tlsrpt.count(domain, policy, target.host, source, result)

    def _remember(self, domain: str, req: TlsRequirement, ok: bool, reason: str) -> None:
        """Tell the intake's in-session check (tls_reachability) what this delivery learnt."""
        if self.tls_policy is None or domain == BAD_GATEWAY or req.mx_patterns:
            return  # MTA-STS answers are for its own MX list, not for a rule's question
        section = self._config().tls_policy
        memory = section.session_probe_memory if ok else section.failure_memory
        self.tls_policy.reachability.record(domain, req.level, ok, reason, "delivery", memory)

    # -- lookups ------------------------------------------------------------------------------

    async def _mail_hosts(self, domain: str) -> MailHosts:
        """The resolver's answer, kept a few seconds: the resolver caches by TTL already, this
        saves the lookup's tasks for every message to the same domain."""
        cached = self._mail_hosts_cache.get(domain)
        if cached is not None:
            return cached
        hosts = await self.resolver.mail_hosts(domain)
        if hosts.status == "ok":
            self._mail_hosts_cache.put(domain, hosts, hosts.ttl)
        return hosts

    async def _targets(self, host: str, port: int, literal_ok: bool) -> tuple[list[Target], str]:
        """The addresses of ``host``.  An address as ``host`` is taken as is only where the
        operator wrote it (``literal_ok``: routing.bad_gateways); an MX never gets here as one."""
        if literal_ok:
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(host)
                return [Target(host, host, port)], ""
        cached = self._targets_cache.get((host, port))
        if cached is not None:
            return cached, ""
        result = await self.resolver.addresses(host)
        if not result.ok:
            return [], f"address lookup for {host} failed: {result.status} {result.rcode}"
        targets = [Target(host, r.address, port) for r in result.records]
        if not result.incomplete:
            self._targets_cache.put((host, port), targets, result.ttl)
        return targets, ""


K = TypeVar("K")
V = TypeVar("V")


class _Remembered(Generic[K, V]):
    """Answers kept ROUTE_CACHE_SECONDS at most, and never past their TTL."""

    def __init__(self) -> None:
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, key: K, value: V, ttl: int) -> None:
        if len(self._entries) > ROUTE_CACHE_SIZE:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + min(ttl, ROUTE_CACHE_SECONDS), value)

    def clear(self) -> None:
        self._entries.clear()


def _bounce_refused(rcpts: Rcpts, refused: list[Refusal]) -> list[RcptOutcome]:
    """Every host was refused: a loop bounces as a loop (5.4.6), the rest as unroutable."""
    loops = [r for r in refused if r.enhanced == LOOP]
    enhanced = LOOP if len(loops) == len(refused) else NOT_ROUTABLE
    reasons = list(dict.fromkeys(r.reason for r in refused))  # each host named once
    reason = "no usable mail host: " + "; ".join(reasons[:3])
    return everyone(rcpts, BOUNCED, reason, enhanced)


def _report_mta_sts_testing(
    message: QueuedMessage, domain: str, target: Target, req: TlsRequirement, tls: TlsOutcome
) -> None:
    """MTA-STS testing: the mail went, but say so if enforce would have refused the session."""
    if tls.verification == "trusted":
        return
    problem = f"TLS {tls.verification} {tls.detail}".strip() if tls.encrypted else "no TLS"
    event(log, "mta_sts_testing", message.id, domain=domain, mx=target.host, problem=problem,
          policy=req.source)  # fmt: skip
