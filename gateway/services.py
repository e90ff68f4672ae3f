"""The long-lived things a running relay shares: built once by ``gateway.server`` (or by
``smg explain`` for a dry run).  A feature that is switched off leaves its slot ``None``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config import Config

if TYPE_CHECKING:  # the types only: importing the modules here would make import cycles
    from gateway.dkim import DkimSigner
    from gateway.dns import Resolver
    from gateway.metrics import Metrics
    from gateway.queue.spool import Spool
    from gateway.scanners.clamd import ClamdClient
    from gateway.scanners.rspamd import RspamdClient
    from gateway.tls_policy import TlsPolicy


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
