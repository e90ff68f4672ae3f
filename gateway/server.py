"""``smg serve``: build the relay's services, run intake + delivery + metrics, handle signals.

Start-up: load and validate the config (a bad one exits ``78``, EX_CONFIG, naming file and
key), open the spool, build the services (``gateway.services.build_services``: resolver, TLS
policy, clamd/rspamd clients, DKIM keys), the chain and the cleanup step, then start delivery,
the SMTP listeners and the metrics endpoint.
Something that cannot start (spool not writable, port taken, a DKIM key unusable) exits ``1``
with the reason.

Signals:

- SIGTERM / SIGINT: stop accepting connections, let SMTP transactions in flight finish (at most
  ``SHUTDOWN_GRACE`` seconds; idle sessions get ``421`` at once), stop delivery (attempts in
  progress stay ``active`` in the spool and are retried at the next start), close the spool.
- SIGHUP: re-read and validate the config; if it is good, sessions that start from then on use
  the new policy (rules, limits, client networks, TLS certificate, DKIM keys, TLS policy) and
  delivery uses the new settings.  Sessions already running finish with the old one, so no mail
  is dropped.  A bad config on reload is logged and the old one stays.  ``gateway.listen``,
  ``gateway.spool``, ``gateway.metrics_listen`` and ``delivery.concurrency`` change only with a
  restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
import time
from pathlib import Path

from gateway.budget import DataBudget
from gateway.config import (
    Config,
    ConfigError,
    config_warnings,
    load_config,
    restart_only_changes,
)
from gateway.delivery.scheduler import Delivery
from gateway.health import Health
from gateway.intake import Intake, Runtime, make_tls_context
from gateway.intake.tenant_limits import TenantGuard, declare_tenant_counters
from gateway.log import event, setup_logging
from gateway.metrics import Metrics
from gateway.metrics_share import CounterShare
from gateway.policy.build import build_chain
from gateway.policy.cleanup import Cleanup
from gateway.queue.spool import Spool, SpoolDamaged, SpoolUnavailable
from gateway.services import Services, build_services
from gateway.tenants.state import TenantState
from gateway.tenants.suspension import Suspension
from gateway.workers import worker_index

log = logging.getLogger("smg.server")

EX_CONFIG = 78  # sysexits.h: configuration error (systemd: RestartPreventExitStatus=78)
SHUTDOWN_GRACE = 30.0  # seconds transactions in flight get to finish on SIGTERM


class StartupError(Exception):
    """The relay cannot start; the message says why."""


class Relay:
    """The running relay: services, intake, delivery, metrics."""

    def __init__(self, config_path: str | Path, config: Config) -> None:
        self.config_path = str(config_path)
        self.config = config
        self.metrics = Metrics()
        self._counter_share: CounterShare | None = None
        self.services: Services | None = None
        self.intake: Intake | None = None
        self.delivery: Delivery | None = None
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self._checking: asyncio.Task[None] | None = None
        self.damaged = False  # the background check of a big spool failed: exit 1

    # --- building -----------------------------------------------------------------------

    def _services(self, config: Config, spool: Spool, previous: Services | None = None) -> Services:
        return build_services(
            config, spool=spool, metrics=self.metrics, shared_tls_state=True, previous=previous
        )

    def _runtime(self, config: Config, services: Services) -> Runtime:
        # The intake checks relay control when a client connects: not again in the chain.
        chain = build_chain(config, services, relay_control=False)
        return Runtime(config, chain, Cleanup(services), make_tls_context(config))

    async def start(self) -> None:
        config = self.config
        _log_config_warnings(config)
        try:
            spool = await Spool.open(config.gateway.spool, check=True)
        except SpoolUnavailable as exc:
            raise StartupError(str(exc)) from None
        try:
            self.services = self._services(config, spool)
            runtime = self._runtime(config, self.services)
        except Exception as exc:  # certificate, DKIM key, scanner endpoint...
            await spool.close()
            raise StartupError(f"{type(exc).__name__}: {exc}") from None
        self._register_gauges(spool)
        budget = DataBudget(config.gateway.data_memory)  # message bytes: intake and delivery
        self.delivery = Delivery(
            config, spool, self.services.resolver, self.services.tls_policy, metrics=self.metrics,
            budget=budget,
        )  # fmt: skip
        await self.delivery.start()
        self.intake = Intake(self.services, runtime, budget)
        try:
            self._tenant_guard(config, spool)
        except sqlite3.Error as exc:  # <spool>/tenants.sqlite not writable
            await self.stop()
            raise StartupError(f"cannot open the tenant state: {exc}") from None
        try:
            await self.intake.start()
            self._share_counters(config)
            if config.gateway.metrics_listen is not None and worker_index() == 0:
                host, port = config.gateway.metrics_listen
                await self.metrics.serve(host, port)
                event(log, "metrics", address=f"{host}:{port}")
        except OSError as exc:
            await self.stop()
            raise StartupError(f"cannot listen: {exc}") from None
        event(log, "ready", role=config.gateway.role, hostname=config.gateway.hostname,
              listen=",".join(f"{h}:{p}" for h, p in self.intake.addresses))  # fmt: skip
        if spool.check_later:
            self._checking = asyncio.get_running_loop().create_task(self._check_spool(spool))

    async def _check_spool(self, spool: Spool) -> None:
        """The start check of a big spool, run while the relay accepts mail (see
        Spool.open): a damaged spool still stops the relay, a little later."""
        started = time.monotonic()
        try:
            await spool.check()
        except SpoolDamaged as exc:
            log.error("stopping: %s", exc)
            self.damaged = True
            self._stop.set()
            return
        except SpoolUnavailable as exc:
            log.warning("the spool check could not run: %s", exc)
            return
        event(log, "spool_checked", seconds=f"{time.monotonic() - started:.1f}")

    def _register_gauges(self, spool: Spool) -> None:
        async def queue_sizes() -> dict[tuple[tuple[str, str], ...], float]:
            counts = await spool.counts()
            return {(("state", state),): float(n) for state, n in counts.items()}

        async def connections() -> dict[tuple[tuple[str, str], ...], float]:
            return {(): float(len(self.intake.sessions) if self.intake else 0)}

        self.metrics.gauge_source(
            "smg_queue_messages", "Messages in the queue by state.", queue_sizes
        )
        self.metrics.gauge_source("smg_connections_active", "SMTP sessions open now.", connections)
        # Queue ages, scanners, the bad gateway, certificate and DKIM keys (gateway/health.py).
        Health(lambda: (self.config, self.services)).register(self.metrics)

    def _share_counters(self, config: Config) -> None:
        """With several workers, worker 0's /metrics carries every worker's counters
        (gateway.metrics_share)."""
        workers = config.gateway.workers
        if workers < 2 or config.gateway.metrics_listen is None:
            return
        self._counter_share = CounterShare(config.gateway.spool, worker_index(), workers)
        if worker_index() == 0:
            self._counter_share.forget_others()
            self.metrics.add_peers(self._counter_share.peers)
        else:
            self._counter_share.start(self.metrics)

    def _tenant_guard(self, config: Config, spool: Spool) -> None:
        """Limits and suspension of the customers, shared by the workers in
        ``<spool>/tenants.sqlite`` (issue 11); their gauges."""
        if not config.tenants or self.intake is None:
            return
        state = TenantState.in_spool(spool.path.parent)
        state.drop_dead_sessions()
        mailbox = config.gateway.operations_mailbox
        suspension = Suspension(spool, config.gateway.hostname, mailbox)
        self.intake.set_guard(TenantGuard(state, self.metrics, suspension))
        names = [t.name for t in config.tenants]
        declare_tenant_counters(self.metrics, names)

        async def suspended() -> dict[tuple[tuple[str, str], ...], float]:
            status = state.all_status()
            return {(("tenant", n),): float(n in status and status[n].suspended) for n in names}

        async def sessions() -> dict[tuple[tuple[str, str], ...], float]:
            counts = state.sessions()
            return {(("tenant", n),): float(counts.get(n, 0)) for n in names}

        self.metrics.gauge_source("smg_tenant_suspended", "1: the customer is suspended.",
                                  suspended)  # fmt: skip
        self.metrics.gauge_source("smg_tenant_sessions", "SMTP sessions of the customer now.",
                                  sessions)  # fmt: skip

    # --- signals ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)

    def _on_stop(self, name: str) -> None:
        event(log, "stopping", signal=name)
        self._stop.set()

    def _on_reload(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.warning("SIGHUP: a reload is already running")
            return
        self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def wait(self) -> None:
        await self._stop.wait()

    async def reload(self) -> bool:
        """Re-read the config; swap it in for new sessions if valid.  True if swapped."""
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            for line in exc.render().splitlines():
                event(log, "reload_failed", level=logging.ERROR, error=line)
            return False
        assert self.services is not None and self.intake is not None
        _log_config_warnings(config)
        for name in restart_only_changes(self.config, config):
            log.warning("reload: %s changed; it takes effect at the next restart", name)
        try:
            services = self._services(config, self.services.spool, self.services)
            runtime = self._runtime(config, services)
        except Exception as exc:  # the new certificate or a DKIM key is unusable
            event(log, "reload_failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            return False
        self.config, self.services = config, services
        self.intake.reload(runtime)
        if self.delivery is not None:
            self.delivery.config = config
            self.delivery.resolver = services.resolver
            self.delivery.tls_policy = services.tls_policy
        setup_logging(config.gateway.log_format)
        event(log, "reloaded", config=self.config_path)
        return True

    # --- stopping -----------------------------------------------------------------------

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        if self.intake is not None:
            await self.intake.stop(grace)
        if self.delivery is not None:
            await self.delivery.stop()
        await self.metrics.close()
        if self._counter_share is not None and worker_index() != 0:
            await self._counter_share.stop(self.metrics)
        if self.services is not None:
            rspamd = self.services.rspamd
            if rspamd is not None:
                with contextlib.suppress(Exception):
                    await rspamd.close()
            if self.services.spool is not None:
                await self.services.spool.close()
        event(log, "stopped")


def _log_config_warnings(config: Config) -> None:
    """What ``smg config validate`` warns about, in the log at start and reload (worker 0
    only: the workers share one file)."""
    if worker_index() != 0:
        return
    for warning in config_warnings(config):
        event(log, "config_warning", level=logging.WARNING, source=config.source,
              key=warning.key, warning=warning.message)  # fmt: skip


async def serve(config_path: str | Path) -> int:
    """Run the relay until SIGTERM/SIGINT; the process exit code."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr, flush=True)
        return EX_CONFIG
    setup_logging(config.gateway.log_format)
    relay = Relay(config_path, config)
    try:
        await relay.start()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    relay.install_signal_handlers()
    await relay.wait()
    await relay.stop()
    return 1 if relay.damaged else 0
