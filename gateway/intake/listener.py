"""The intake's listeners and sessions: what a session works with, the connection cap, the
graceful stop, and the swap of the runtime on a reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

from gateway.budget import DataBudget
from gateway.config import Config
from gateway.intake.handler import PolicyHandler
from gateway.intake.protocol import GatewaySMTP
from gateway.intake.tenant_limits import TenantGuard
from gateway.log import event
from gateway.metrics import Metrics
from gateway.policy.chain import Chain, Reply
from gateway.policy.cleanup import Cleanup
from gateway.services import Services
from gateway.tenants import TenantTable

log = logging.getLogger("smg.intake")


@dataclass(frozen=True)
class Runtime:
    """What a session works with; a reload (SIGHUP) swaps it for sessions that start later."""

    config: Config
    chain: Chain
    cleanup: Cleanup
    tls_context: ssl.SSLContext | None = None
    tenants: TenantTable | None = None  # None: built from config.tenants


def make_tls_context(config: Config) -> ssl.SSLContext | None:
    """The server-side context for STARTTLS, or None without ``gateway.tls_cert``."""
    gateway = config.gateway
    if gateway.tls_cert is None or gateway.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(gateway.tls_cert), str(gateway.tls_key))
    return context


class Intake:
    """The listeners and the sessions; :meth:`reload` swaps the runtime for new sessions."""

    def __init__(
        self, services: Services, runtime: Runtime, data_budget: DataBudget | None = None
    ) -> None:
        """``services``: only their metrics are the intake's; the runtime's cleanup step
        holds the rest (the spool, the DKIM signer).  ``data_budget``: the process's memory
        budget for message bytes, shared with delivery (a new one without)."""
        self.metrics: Metrics = services.metrics or Metrics()
        self.sessions: set[GatewaySMTP] = set()
        self.guard: TenantGuard | None = None  # set by the relay when it has [[tenants]]
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping = False
        # One budget for the process's sessions, kept across reloads (a reload sets its size).
        self.data_budget = data_budget or DataBudget(runtime.config.gateway.data_memory)
        self._idle = asyncio.Event()
        self._idle.set()
        self._use(runtime)

    def _use(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.data_budget.resize(runtime.config.gateway.data_memory)
        self.handler = PolicyHandler(
            runtime.chain, runtime.cleanup, runtime.config.gateway.client_networks, self.metrics,
            runtime.tenants or TenantTable.from_config(runtime.config),
        )  # fmt: skip
        self.handler.guard = getattr(self, "guard", None)

    def set_guard(self, guard: TenantGuard | None) -> None:
        self.guard = self.handler.guard = guard

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.runtime.config.gateway.listen:
            server = await loop.create_server(
                self._new_session, host, port, reuse_address=True,
                reuse_port=self.runtime.config.gateway.workers > 1,  # gateway/workers.py
            )  # fmt: skip
            self.servers.append(server)
            event(log, "listening", address=f"{host}:{port}")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the listeners are bound (port 0 in the config: the port picked)."""
        return [sock.getsockname()[:2] for s in self.servers for sock in s.sockets]

    def reload(self, runtime: Runtime) -> None:
        old = self.runtime.config.gateway.listen
        if runtime.config.gateway.listen != old:
            log.warning("gateway.listen changed: takes effect at the next restart, not on reload")
        self._use(runtime)

    def _new_session(self) -> GatewaySMTP:
        return GatewaySMTP(self, self.runtime.config, self.handler, self.runtime.tls_context)

    def admit(self, session: GatewaySMTP, client_ip: str) -> str | None:
        """Relay control (the session's handler) and the connection cap, when a client
        connects: the refusal to send instead of the greeting, or None."""
        config = session.config.gateway
        if self.stopping:
            return str(
                Reply(421, "4.3.2", f"{config.hostname} Service shutting down, try again later")
            )
        refusal, session.tenant = session.handler.identify(client_ip)
        if refusal is not None:
            return refusal
        if len(self.sessions) >= config.max_connections:
            self.metrics.inc("connections_refused", reason="max_connections")
            event(log, "reject", "NOQUEUE", stage="connect", client=client_ip,
                  reason="max_connections", limit=config.max_connections)  # fmt: skip
            return str(
                Reply(421, "4.7.0", f"{config.hostname} Too many connections, try again later")
            )
        if session.tenant is not None and self.guard is not None:
            over = self.guard.at_connect(session.tenant, client_ip, config.hostname)
            if over is not None:
                return over
            session.counted = session.tenant  # released when the session ends
        self.sessions.add(session)
        self._idle.clear()
        self.metrics.inc("connections")
        return None

    def session_ended(self, session: GatewaySMTP) -> None:
        self.sessions.discard(session)
        counted = getattr(session, "counted", None)
        if counted is not None and self.guard is not None:
            session.counted = None
            self.guard.session_ended(counted, session.client_ip)
        if not self.sessions:
            self._idle.set()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let transactions in flight finish (at most ``grace`` seconds),
        then close every session with ``421``."""
        self.stopping = True
        for server in self.servers:
            server.close()
        for session in list(self.sessions):
            if not session.busy:
                session.close_with("421 4.3.2 Service shutting down, try again later")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        for session in list(self.sessions):
            session.close_with("421 4.3.2 Service shutting down, try again later")
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.servers.clear()
