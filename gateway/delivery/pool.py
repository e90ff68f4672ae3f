"""Sessions and their pool: idle SMTP sessions per (address, port, source, TLS requirement),
reused for ``delivery.connection_reuse`` seconds; at most ``max_connections_per_host`` in use
per (address, port).  :meth:`ConnectionPool.deliver` runs a message's transactions on a
pooled session or a fresh one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from gateway.delivery.client import (
    Dialer,
    Disconnected,
    HostFailed,
    Lost,
    SmtpConnection,
    Target,
    transaction,
)
from gateway.delivery.outcome import DEFERRED, RcptOutcome, Rcpts
from gateway.queue.model import QueuedMessage
from gateway.tls.levels import DANE, VERIFY
from gateway.tls.policy import TlsRequirement
from gateway.tls.verify import TlsOutcome

RCPTS_PER_TRANSACTION = 50  # like Postfix's smtp_destination_recipient_limit
MAX_SESSION_AGE = 300.0  # a busy session is still renewed after this (like Postfix's 300 s)

# (ip, port, source address, TLS level, CA bundle, host name when verified)
SessionKey = tuple[str, int, str | None, str, str, str]


@dataclass
class Session:
    connection: SmtpConnection
    key: SessionKey
    target: Target
    tls: TlsOutcome
    created: float
    last_used: float = 0.0
    transactions: int = 0

    @property
    def usable(self) -> bool:
        return self.connection.is_connected


class StaleSession(Exception):
    """A reused session turned out closed before anything was sent: open a fresh one."""


class ConnectionPool:
    """Idle SMTP sessions per (ip, port, source, TLS key), kept ``reuse`` seconds; at most
    ``per_host`` sessions in use per (ip, port)."""

    def __init__(self, reuse: float, per_host: int) -> None:
        self.reuse = reuse
        self.per_host = max(1, per_host)
        self._idle: dict[SessionKey, list[Session]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self.opened = 0
        self.reused = 0
        self._quitting: set[asyncio.Task[None]] = set()

    def slot(self, target: Target) -> asyncio.Semaphore:
        key = (target.ip, target.port)
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(self.per_host)
        return self._slots[key]

    def take(self, key: SessionKey) -> Session | None:
        sessions = self._idle.get(key)
        now = time.monotonic()
        while sessions:
            session = sessions.pop()
            if session.usable and now - session.last_used < self.reuse:
                self.reused += 1
                return session
            _close_quietly(session)
        return None

    def give_back(self, session: Session) -> None:
        too_old = time.monotonic() - session.created > MAX_SESSION_AGE
        if not session.usable or self.reuse <= 0 or too_old:
            if too_old and session.usable:
                task = asyncio.get_running_loop().create_task(_quit(session))
                self._quitting.add(task)  # a reference, so the task is not collected early
                task.add_done_callback(self._quitting.discard)
            else:
                _close_quietly(session)
            return
        session.last_used = time.monotonic()
        self._idle.setdefault(session.key, []).append(session)

    async def reap(self) -> None:
        """Close sessions idle for longer than ``reuse`` (QUIT, then close)."""
        now = time.monotonic()
        for key, sessions in list(self._idle.items()):
            stale = [s for s in sessions if now - s.last_used >= self.reuse or not s.usable]
            if not stale:
                continue
            self._idle[key] = [s for s in sessions if s not in stale]
            await asyncio.gather(*(_quit(s) for s in stale))

    async def close(self) -> None:
        sessions = [s for group in self._idle.values() for s in group]
        self._idle.clear()
        await asyncio.gather(*(_quit(s) for s in sessions))

    # -- delivering on a session ---------------------------------------------------------------

    async def deliver(
        self,
        dialer: Dialer,
        target: Target,
        requirement: TlsRequirement,
        message: QueuedMessage,
        rcpts: Rcpts,
        payload: bytes,
    ) -> list[RcptOutcome]:
        """The message's transactions to ``target`` on an idle session, else a fresh one
        (raises :class:`HostFailed` if a fresh one cannot take it: try the next address)."""
        key = _session_key(dialer, target, requirement)
        async with self.slot(target):
            session = self.take(key)
            if session is not None:
                try:
                    return await self._use(session, message, rcpts, payload)
                except StaleSession:
                    pass  # the far end closed the idle session: open a fresh one
            connection, tls = await dialer.open(target, requirement)
            self.opened += 1
            session = Session(connection, key, target, tls, time.monotonic())
            try:
                return await self._use(session, message, rcpts, payload)
            except StaleSession as exc:
                raise HostFailed(f"connection lost: {exc}") from exc

    async def _use(
        self, session: Session, message: QueuedMessage, rcpts: Rcpts, payload: bytes
    ) -> list[RcptOutcome]:
        """Run the transactions on one session and give it back to the pool.

        Lost before any DATA: a reused session raises :class:`StaleSession` (the caller opens
        a fresh one), a fresh one :class:`HostFailed` (next address).  Lost later: the
        recipients not yet done are deferred ("may be sent twice", as with any MTA).
        """
        outcomes: list[RcptOutcome] = []
        for start in range(0, len(rcpts), RCPTS_PER_TRANSACTION):
            chunk = rcpts[start : start + RCPTS_PER_TRANSACTION]
            try:
                outcomes += await transaction(
                    session.connection, session.target, session.tls, message, chunk, payload
                )
            except (Exception, asyncio.CancelledError) as exc:
                _close_quietly(session)
                if not isinstance(exc, Lost):  # a bug or a stop: never reuse this session
                    raise
                if not outcomes and not exc.during_data:
                    if session.transactions > 0 or session.last_used > 0:
                        raise StaleSession(exc.reply) from exc
                    raise HostFailed(exc.reply) from exc
                remaining = rcpts[len(outcomes) :]
                return outcomes + _deferred(session, remaining, exc.reply)
            session.transactions += 1
        self.give_back(session)
        return outcomes


def _deferred(session: Session, rcpts: Rcpts, reply: str) -> list[RcptOutcome]:
    """The recipients a broken session left undone: deferred (they may have been sent)."""
    target = session.target
    return [
        RcptOutcome(p, a, DEFERRED, reply, "4.4.2", target.host, target.relay, session.tls)
        for p, a in rcpts
    ]


def _session_key(dialer: Dialer, target: Target, requirement: TlsRequirement) -> SessionKey:
    name = target.host if requirement.level in (VERIFY, DANE) else ""
    if requirement.tlsa:  # a session authenticated against other records is not reused
        name += " " + ",".join(sorted(r.text() for r in requirement.tlsa))
    return (
        target.ip,
        target.port,
        dialer.config.gateway.source_address,
        requirement.level,
        str(requirement.ca_bundle or ""),
        name,
    )


async def _quit(session: Session) -> None:
    try:
        if session.usable:
            await asyncio.wait_for(session.connection.quit(), 2.0)
    except (Disconnected, OSError, TimeoutError):
        pass
    finally:
        _close_quietly(session)


def _close_quietly(session: Session) -> None:
    with contextlib.suppress(Exception):
        session.connection.close()
