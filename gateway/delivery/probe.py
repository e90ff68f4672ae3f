"""The in-session TLS probe: could a delivery to this domain get the TLS a rule needs, now?

The same steps as a delivery under the requirement (:class:`~gateway.delivery.client.Dialer`:
connect from ``gateway.source_address``, EHLO, STARTTLS, verify as the level says, EHLO), then
QUIT instead of MAIL FROM: nothing of any message is sent.  The same address rules as delivery
(:class:`~gateway.delivery.screen.Screen`: public addresses only, never ourselves, no address
literals), the delivery port only, the whole probe bounded by ``timeout``.

The verdict follows delivery's: one MX that gives the TLS -> ok; a TLS failure on some MX and
no MX that worked -> definitive (delivery would bounce under the reject rule); only connection
problems, a DNS failure or the time running out -> temporary (450: the client retries).  A
domain that has no usable MX at all (NXDOMAIN, null MX, internal addresses only) is not a TLS
question: ok, and delivery bounces it as it does today.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from gateway.config import Config
from gateway.delivery.client import Dialer, HostFailed, Target
from gateway.delivery.dane import dane_applies, host_requirement
from gateway.delivery.screen import Screen, address_literal
from gateway.dns import Resolver
from gateway.tls.dane import DaneResolver
from gateway.tls.levels import DANE
from gateway.tls.policy import TlsRequirement


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    temporary: bool
    reason: str
    relay: str = ""
    seconds: float = 0.0


class SessionProber:
    """Probes for the intake, with the delivery configuration's dialer and address rules."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        dane: DaneResolver | None = None,
        max_parallel: int = 32,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.dane = dane
        self.dialer = Dialer(config)
        self.screen = Screen(resolver, config.gateway.listen)
        self._parallel = asyncio.Semaphore(max_parallel)  # per process, whatever the flood

    async def probe(self, domain: str, requirement: TlsRequirement, timeout: float) -> ProbeResult:
        started = time.monotonic()
        try:
            async with self._parallel, asyncio.timeout(timeout):
                result = await self._probe(domain, requirement)
        except TimeoutError:
            result = ProbeResult(False, True, f"TLS probe of {domain} timed out after {timeout:g}s")
        return ProbeResult(result.ok, result.temporary, result.reason, result.relay,
                           time.monotonic() - started)  # fmt: skip

    async def _probe(self, domain: str, requirement: TlsRequirement) -> ProbeResult:
        hosts = await self.resolver.mail_hosts(domain)
        if hosts.null_mx or hosts.status == "nxdomain":
            return ProbeResult(True, False, f"{domain} takes no mail: decided at delivery")
        if hosts.status != "ok" or not hosts.hosts:
            detail = f"{hosts.status} {hosts.rcode} {hosts.detail}".strip()
            return ProbeResult(False, True, f"MX lookup for {domain} failed: {detail}")
        port = self.config.delivery.port
        tls_errors: list[str] = []
        other_errors: list[str] = []
        tried = 0
        dane = await dane_applies(self.dane, domain, requirement)
        if requirement.level == DANE and not dane:
            return ProbeResult(False, False, f"the MX records of {domain} are not DNSSEC-secure")
        for name in hosts.names:
            if address_literal(name) or not requirement.mx_allowed(name):
                continue
            host_req = requirement
            if dane and self.dane is not None:
                host_req, problem, tls = await host_requirement(self.dane, name, requirement)
                if problem:
                    (tls_errors if tls else other_errors).append(problem)
                    continue
            found = await self.resolver.addresses(name)
            if not found.ok:
                other_errors.append(f"address lookup for {name} failed: {found.status}")
                continue
            for record in found.records:
                target = Target(name, record.address, port)
                if self.screen.refusal(domain, name, target.ip, port, public_only=True):
                    continue
                tried += 1
                try:
                    connection, _ = await self.dialer.open(target, host_req)
                except HostFailed as exc:
                    (tls_errors if exc.tls else other_errors).append(f"{target.relay}: {exc.reply}")
                    continue
                with contextlib.suppress(Exception):
                    await connection.quit()
                return ProbeResult(True, False, f"{host_req.level} TLS works", target.relay)
        if tls_errors:
            return ProbeResult(False, False, "; ".join(tls_errors[-3:]))
        if not tried and not other_errors:
            return ProbeResult(
                True, False, f"no usable MX address for {domain}: decided at delivery"
            )
        return ProbeResult(False, True, "; ".join(other_errors[-3:]) or "no MX answered")
