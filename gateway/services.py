"""The long-lived things a running relay shares: built once by ``gateway.server``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config


@dataclass
class Services:
    config: Config
    resolver: Any = None  # gateway.dns.Resolver
    spool: Any = None  # gateway.spool.Spool
    clamd: Any = None  # gateway.scanners.clamd.ClamdClient
    rspamd: Any = None  # gateway.scanners.rspamd.RspamdClient
    tls_policy: Any = None  # gateway.tls_policy.TlsPolicy
    dkim: Any = None  # gateway.dkim.DkimSigner
    metrics: Any = None  # gateway.metrics.Metrics
    extras: dict[str, Any] = field(default_factory=dict)
