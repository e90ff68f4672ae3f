"""The long-lived things a running relay shares, and the one function that builds them.

``smg serve`` (``gateway.server``) builds them at start and again on each reload; ``smg explain``
builds the same ones without a spool for its dry run.  A feature that is switched off leaves
its slot ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.config import Config
from gateway.dkim import DkimSigner
from gateway.dns import Resolver
from gateway.metrics import Metrics
from gateway.queue.spool import Spool
from gateway.scanners.clamd import ClamdClient
from gateway.scanners.rspamd import RspamdClient
from gateway.tls.policy import TlsPolicy


@dataclass
class Services:
    config: Config
    resolver: Resolver | None = None
    spool: Spool | None = None
    clamd: ClamdClient | None = None
    rspamd: RspamdClient | None = None
    tls_policy: TlsPolicy | None = None
    dkim: DkimSigner | None = None
    metrics: Metrics | None = None
    # Each customer's own signer (its [[tenants]] dkim keys): its mail is signed with these only.
    tenant_dkim: dict[str, DkimSigner] | None = None


def build_services(
    config: Config,
    *,
    spool: Spool | None = None,
    metrics: Metrics | None = None,
    shared_tls_state: bool = False,
    previous: Services | None = None,
) -> Services:
    """The services ``config`` asks for.

    ``spool``: the opened spool when serving (None for a dry run: nothing can be queued).
    ``shared_tls_state``: the relay keeps TLS failures and MTA-STS policies on disk, shared by
    its workers; tools keep theirs in memory.  ``previous``: the services before a reload,
    whose scanner clients are reused when their section did not change (they keep their
    connections) and whose TLS state is carried over.  A good gateway loads its DKIM keys
    here: an unusable key raises :class:`gateway.dkim.DkimKeyError`, so the relay refuses to
    start (or to reload)."""
    resolver = Resolver(config.dns)
    tls_policy = TlsPolicy(config, resolver, shared_state=shared_tls_state)
    if previous is not None and previous.tls_policy is not None:
        tls_policy.carry_over(previous.tls_policy)  # TLS failures, MTA-STS cache
    role = config.gateway.role
    return Services(
        config,
        resolver=resolver,
        spool=spool,
        clamd=_clamd(config, previous) if config.virus.enabled else None,
        rspamd=_rspamd(config, previous) if role == "good" and config.spam.enabled else None,
        tls_policy=tls_policy,
        dkim=DkimSigner.from_config(config.dkim) if role == "good" else None,
        metrics=metrics,
        tenant_dkim=_tenant_signers(config) if role == "good" else None,
    )


def _tenant_signers(config: Config) -> dict[str, DkimSigner]:
    """One signer per customer with keys (the fleet's signed header list)."""
    return {
        tenant.name: DkimSigner.from_config(replace(config.dkim, keys=list(tenant.dkim)))
        for tenant in config.tenants
        if tenant.dkim
    }


def _clamd(config: Config, previous: Services | None) -> ClamdClient:
    if previous is not None and previous.clamd and previous.config.virus == config.virus:
        return previous.clamd
    return ClamdClient.from_config(config.virus)


def _rspamd(config: Config, previous: Services | None) -> RspamdClient:
    if previous is not None and previous.rspamd and previous.config.spam == config.spam:
        return previous.rspamd
    return RspamdClient.from_config(config.spam)
