"""Delivery: the scheduler that takes due messages from the spool and the SMTP client that
hands them to the far end.

Scheduler.  New messages come by an in-memory hand-off from :meth:`Spool.enqueue` (delivered at
once); everything else (retries, released holds, messages left active by a crash) is found by
polling the spool every ``delivery.scan_interval``.  At most ``delivery.concurrency`` messages
are in an attempt at a time.  Every attempt ends in one spool operation
(:meth:`Spool.finish_attempt`) that records each recipient's outcome, queues the NDR for the
failed ones in the same transaction, and moves the message on: removed (nothing pending),
``deferred`` with exponential backoff, or ``held`` (TLS could not be had).

Routing.  Route ``direct``: per recipient domain the MX hosts in preference order (or the
implicit MX); a null MX bounces at once.  Route ``bad_gateway`` (spam on a good gateway): the
``routing.bad_gateways`` in order with TLS verified against ``routing.internal_ca``; if none
answers the message stays deferred: it never goes direct.  Before a message leaves directly,
the internal verdict header is removed.

TLS.  STARTTLS whenever offered.  Under a :class:`TlsRequirement` of ``encrypt`` or ``verify``
nothing is ever sent in cleartext: a missing STARTTLS, a failed handshake or a failed
verification moves on to the next MX; when none is left the message is held (retried every
``tls_policy.hold_retry``) or bounced, as the requirement's ``on_failure`` says.

Connections are pooled per (address, port, source, TLS requirement) and reused for
``delivery.connection_reuse`` seconds; several recipients of one domain go in one transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtplib import errors as smtp_errors

from gateway import dsn
from gateway.config import Config
from gateway.log import event
from gateway.queue.model import (
    AttemptOutcome,
    AttemptResult,
    HoldReason,
    NewMessage,
    QueuedMessage,
    RecipientUpdate,
)
from gateway.queue.spool import Spool, SpoolUnavailable
from gateway.tls_policy import NO_TLS, VERIFY, TlsOutcome, TlsRequirement, describe_tls

log = logging.getLogger("smg.delivery")

RCPTS_PER_TRANSACTION = 50  # like Postfix's smtp_destination_recipient_limit
HANDOFF_BACKLOG = 10000  # messages waiting in memory at most; beyond, the poll finds them
RECORD_TRIES = 15  # writes of an attempt's result while the spool is unavailable (~6 min)
MAX_SESSION_AGE = 300.0  # a busy session is still renewed after this (like Postfix's 300 s)
ROUTE_CACHE_SECONDS = 10  # MX and address answers reused this long at most (and never past TTL)
ROUTE_CACHE_SIZE = 10000
STALE_HANDOFF = 1.0  # a hand-off older than this is re-checked against the spool (held?)

SENT, DEFERRED, BOUNCED, HELD = "sent", "deferred", "bounced", "held"


# --- outcomes ------------------------------------------------------------------------------


@dataclass
class RcptOutcome:
    """What happened to one recipient in this attempt."""

    position: int
    address: str
    status: str  # sent | deferred | bounced | held
    reply: str = ""  # the far end's reply ("550 5.1.1 ...") or our own reason
    enhanced: str = ""  # RFC 3463 status for the NDR
    remote_mta: str | None = None  # host name (for the NDR's Remote-MTA)
    relay: str = ""  # host[ip]:port (for the log)
    tls: TlsOutcome = NO_TLS
    from_far_end: bool = False  # reply came from the far end (Diagnostic-Code: smtp;)


_DISCONNECTED = (smtp_errors.SMTPServerDisconnected, smtp_errors.SMTPTimeoutError, OSError)


class _Lost(Exception):
    """The session broke inside a transaction (``during_data``: after DATA was sent)."""

    def __init__(self, reply: str, *, during_data: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.during_data = during_data


class _StaleSession(Exception):
    """A reused session turned out closed before anything was sent: open a fresh one."""


class _HostFailed(Exception):
    """This address could not take the mail (connect, greeting, EHLO, TLS): try the next."""

    def __init__(self, reply: str, *, tls: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.tls = tls


@dataclass(frozen=True)
class _Target:
    """One address to try: the host name (for TLS and logs), its IP and port."""

    host: str
    ip: str
    port: int

    @property
    def relay(self) -> str:
        return f"{self.host}[{self.ip}]:{self.port}"


def _reply_text(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}".strip()


def _code_status(code: int) -> str:
    return SENT if 200 <= code < 300 else BOUNCED if code >= 500 else DEFERRED


# --- message bytes --------------------------------------------------------------------------


def strip_header(data: bytes, name: str) -> bytes:
    """``data`` without every ``name:`` header field (folded lines included); the body is
    untouched."""
    end = re.search(rb"\r?\n\r?\n", data)
    if end:
        split = end.start() + (2 if data[end.start() : end.start() + 1] == b"\r" else 1)
        head, rest = data[:split], data[split:]  # rest: the empty line, then the body
    else:
        head, rest = data, b""
    wanted = name.lower().encode("ascii") + b":"
    if wanted not in head.lower():
        return data
    kept: list[bytes] = []
    dropping = False
    for line in re.split(rb"(?<=\n)", head):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(wanted)
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest


def wire_bytes(data: bytes) -> bytes:
    """The message as it goes after DATA: ending in CRLF (aiosmtplib adds the dot line)."""
    return data if data.endswith(b"\n") else data + b"\r\n"


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _clean_address(address: str) -> bool:
    """No CR, LF or other control characters (they would inject commands)."""
    return _CONTROL_CHARACTERS.search(address) is None


def _needs_smtputf8(sender: str, recipients: Sequence[str]) -> bool:
    return not all(a.isascii() for a in (sender, *recipients))


# --- connections ---------------------------------------------------------------------------


class _Replies(asyncio.Protocol):
    """Reads SMTP replies into a queue, for transactions sent with PIPELINING (RFC 2920)."""

    MAX_BUFFER = 65536  # a reply longer than this is not SMTP

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.replies: collections.deque[tuple[int, str]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: str | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            start, lines = 0, []
            complete = False
            while end >= 0:
                line = bytes(self.buffer[start : end + 1]).rstrip(b"\r\n")
                lines.append(line)
                start = end + 1
                if line[3:4] != b"-":
                    complete = True
                    break
                end = self.buffer.find(b"\n", start)
            if not complete:
                break
            del self.buffer[:start]
            code = lines[-1][:3]
            if not code.isdigit():
                self._lose(f"malformed reply {lines[-1][:80]!r}")
                return
            text = "\n".join(x[4:].decode("utf-8", "replace").strip() for x in lines)
            self.replies.append((int(code), text))
        if len(self.buffer) > self.MAX_BUFFER:
            self._lose("reply too long")
        self._wake()

    def eof_received(self) -> bool:
        self._lose("connection closed by the far end")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost: {exc}" if exc else "connection closed")

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def reply(self) -> tuple[int, str]:
        while not self.replies:
            if self.lost is not None:
                raise smtp_errors.SMTPServerDisconnected(self.lost)
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.replies.popleft()


class _PipelinedSmtp:
    """A session aiosmtplib opened (greeting, EHLO, STARTTLS), taken over for transactions
    sent with PIPELINING: MAIL, every RCPT and DATA in one write, one round trip instead of
    three or more (aiosmtplib waits for each reply before the next command)."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.extensions = dict(smtp.esmtp_extensions)
        self.transport: asyncio.WriteTransport = smtp.transport  # type: ignore[assignment]
        self.replies = _Replies()
        self.transport.set_protocol(self.replies)
        smtp.transport = None  # aiosmtplib must not close what is ours now
        smtp.protocol = None

    @property
    def is_connected(self) -> bool:
        return self.replies.lost is None and not self.transport.is_closing()

    def supports_extension(self, name: str) -> bool:
        return name.lower() in self.extensions

    def write(self, data: bytes) -> None:
        if not self.is_connected:
            raise smtp_errors.SMTPServerDisconnected(self.replies.lost or "connection closed")
        self.transport.write(data)

    async def reply(self) -> tuple[int, str]:
        return await self.replies.reply()

    async def rset(self) -> None:
        self.write(b"RSET\r\n")
        await self.reply()

    async def quit(self) -> None:
        try:
            self.write(b"QUIT\r\n")
            await self.reply()
        finally:
            self.close()

    def close(self) -> None:
        self.transport.close()


_LINE_ENDS = re.compile(rb"\r\n|\n|\r")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def data_block(data: bytes) -> bytes:
    """The message as sent after a 354: CRLF line ends, dot-stuffed, ending in CRLF.CRLF."""
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = _LINE_ENDS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data + b".\r\n"


@dataclass
class _Session:
    smtp: Any  # aiosmtplib.SMTP, or _PipelinedSmtp when the far end offers PIPELINING
    key: tuple[Any, ...]
    target: _Target
    tls: TlsOutcome
    created: float
    last_used: float = 0.0
    transactions: int = 0

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected


class ConnectionPool:
    """Idle SMTP sessions per (ip, port, source, TLS key), kept ``reuse`` seconds; at most
    ``per_host`` sessions in use per (ip, port)."""

    def __init__(self, reuse: float, per_host: int) -> None:
        self.reuse = reuse
        self.per_host = max(1, per_host)
        self._idle: dict[tuple[Any, ...], list[_Session]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self.opened = 0
        self.reused = 0
        self._quitting: set[asyncio.Task[None]] = set()

    def slot(self, target: _Target) -> asyncio.Semaphore:
        key = (target.ip, target.port)
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(self.per_host)
        return self._slots[key]

    def take(self, key: tuple[Any, ...]) -> _Session | None:
        sessions = self._idle.get(key)
        now = time.monotonic()
        while sessions:
            session = sessions.pop()
            if session.usable and now - session.last_used < self.reuse:
                self.reused += 1
                return session
            _close_quietly(session)
        return None

    def give_back(self, session: _Session) -> None:
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


async def _quit(session: _Session) -> None:
    try:
        if session.usable:
            await asyncio.wait_for(session.smtp.quit(), 2.0)
    except (smtp_errors.SMTPException, OSError, TimeoutError):
        pass
    finally:
        _close_quietly(session)


def _close_quietly(session: _Session) -> None:
    with contextlib.suppress(Exception):
        session.smtp.close()


# --- the delivery agent --------------------------------------------------------------------


@dataclass
class _Work:
    queue_id: str
    message: QueuedMessage | None  # None: found by the poll, loaded from the spool
    queued_at: float = field(default_factory=time.monotonic)


class Delivery:
    """The scheduler and SMTP client.  ``await start()`` once the spool is open; ``await
    stop()`` on shutdown (attempts in progress are abandoned; their messages are still
    ``active`` in the spool and are retried at the next start)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        resolver: Any,
        tls_policy: Any = None,
        *,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self.spool = spool
        self.resolver = resolver
        self.tls_policy = tls_policy
        self.metrics = metrics
        self.clock = clock
        section = config.delivery
        self.concurrency = max(1, section.concurrency)
        self.pool = ConnectionPool(section.connection_reuse, section.max_connections_per_host)
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._known: set[str] = set()  # ids waiting in _queue or in an attempt
        self._cooldown: dict[str, float] = {}  # ids whose result could not be recorded
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # the workers' queue is short again (see _poll_loop)
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self._route_cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self.attempts = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.spool.add_listener(self._handoff)
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"smg-delivery-{i}")
            for i in range(self.concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="smg-delivery-poll"))
        self._tasks.append(asyncio.create_task(self._reap_loop(), name="smg-delivery-reap"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.pool.close()

    def wake(self) -> None:
        """Poll the spool now (after an in-process flush or release)."""
        self._wake.set()

    @property
    def in_progress(self) -> int:
        return len(self._known)

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload (SIGHUP): new settings for the next attempts; TLS contexts (CA bundles may
        have changed) and remembered routes are built again; idle sessions are kept.
        ``delivery.concurrency`` and the pool's limits change with a restart only."""
        self._config = config
        self._contexts.clear()
        self._route_cache.clear()
        self.pool.reuse = config.delivery.connection_reuse

    # -- scheduling -----------------------------------------------------------------------

    def _handoff(self, message: QueuedMessage) -> None:
        if message.id in self._known or self._queue.qsize() >= HANDOFF_BACKLOG:
            return  # already scheduled, or too many in memory: the poll will find it
        self._known.add(message.id)
        self._queue.put_nowait(_Work(message.id, message))

    async def _poll_loop(self) -> None:
        interval = max(0.05, self.config.delivery.scan_interval)
        while True:
            backlog = False
            with contextlib.suppress(Exception):
                backlog = await self._poll_once()
            if backlog:
                # More is due than one search returned (a restart with a full queue, a flush):
                # search again as soon as the workers have room, not a whole interval later.
                await self._room.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()

    async def _poll_once(self) -> bool:
        """Queue due messages for the workers; True if there may be more due right now."""
        if self._queue.qsize() >= self.concurrency:
            return False  # the workers have enough to do; keeps the poll cheap under load
        limit = len(self._known) + 2 * self.concurrency
        try:
            due = await self.spool.due(limit, self.clock())
        except SpoolUnavailable as exc:
            log.warning("spool poll failed: %s", exc)
            return False
        now = self.clock()
        for queue_id, until in list(self._cooldown.items()):
            if until <= now:
                del self._cooldown[queue_id]
        added = 0
        for queue_id in due:
            if queue_id not in self._known and queue_id not in self._cooldown:
                self._known.add(queue_id)
                self._queue.put_nowait(_Work(queue_id, None))
                added += 1
        if len(due) >= limit and added:
            self._room.clear()
            return True
        return False

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self.pool.reap()

    async def _worker(self) -> None:
        while True:
            if self._queue.qsize() < self.concurrency:
                self._room.set()  # the poll may search again
            work = await self._queue.get()
            try:
                await self._process(work)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue_id=%s delivery attempt failed unexpectedly", work.queue_id)
                await self._defer_after_bug(work.queue_id)
            finally:
                self._known.discard(work.queue_id)

    async def _record(self, result: AttemptResult) -> AttemptOutcome:
        """Write the attempt's result; while the spool is unavailable (disk full), keep trying
        (bounded), because a message left ``active`` would be attempted again at once."""
        delay = 1.0
        for _ in range(RECORD_TRIES - 1):
            try:
                return await self.spool.finish_attempt(result)
            except SpoolUnavailable as exc:
                event(log, "spool_error", result.queue_id, level=logging.ERROR, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        try:
            return await self.spool.finish_attempt(result)
        except SpoolUnavailable:
            # Give up for now; do not pick it up again before retry_max.
            self._cooldown[result.queue_id] = self.clock() + self.config.delivery.retry_max
            raise

    async def _defer_after_bug(self, queue_id: str) -> None:
        """A bug must not make a message spin: defer it by retry_initial."""
        with contextlib.suppress(Exception):
            await self.spool.finish_attempt(
                AttemptResult(
                    queue_id, [], "deferred", self.clock() + self.config.delivery.retry_initial
                )
            )

    async def _claim(self, work: _Work) -> QueuedMessage | None:
        """The message to attempt, or None if an operator held or deleted it meanwhile."""
        if work.message is None:
            if not await self.spool.begin_attempt(work.queue_id):
                return None
            return await self.spool.load(work.queue_id)
        # A hand-off that waited in memory is checked again: an operator may have acted.
        stale = time.monotonic() - work.queued_at > STALE_HANDOFF
        if stale and await self.spool.state_of(work.queue_id) != "active":
            return None
        return work.message

    async def _process(self, work: _Work) -> None:
        message = await self._claim(work)
        if message is None:
            return
        if not message.pending:  # nothing left to do (should not happen): do not keep it active
            await self._record(AttemptResult(message.id, [], complete=True))
            return
        started = time.monotonic()
        outcomes = await self.attempt(message)
        self.attempts += 1
        result = self._result(message, outcomes)
        outcome = await self._record(result)
        self._log_attempt(message, outcomes, time.monotonic() - started, outcome.state)
        if outcome.ndr_id:
            event(log, "ndr", message.id, ndr=outcome.ndr_id, to=f"<{message.sender}>")

    # -- one attempt ----------------------------------------------------------------------

    async def attempt(self, message: QueuedMessage) -> list[RcptOutcome]:
        """Try every pending recipient once; returns one outcome per recipient."""
        payload = wire_bytes(message.data)
        if message.route == "direct":
            payload = strip_header(payload, self.config.routing.verdict_header)
            groups: dict[str, list[tuple[int, str]]] = {}
            for rcpt in message.pending:
                domain = rcpt.address.rpartition("@")[2].lower()
                groups.setdefault(domain, []).append((rcpt.position, rcpt.address))
            tasks = [
                self._deliver_domain(message, domain, rcpts, payload)
                for domain, rcpts in groups.items()
            ]
        else:
            rcpts = [(r.position, r.address) for r in message.pending]
            tasks = [self._deliver_bad_gateway(message, rcpts, payload)]
        if len(tasks) == 1:  # the usual case: no extra tasks
            return await tasks[0]
        results = await asyncio.gather(*tasks)
        return [outcome for group in results for outcome in group]

    async def _requirement(self, message: QueuedMessage, domain: str) -> TlsRequirement:
        if self.tls_policy is None:
            return TlsRequirement()
        sender_domain = message.sender.rpartition("@")[2].lower() if message.sender else ""
        return await self.tls_policy.requirement(sender_domain, domain)

    async def _deliver_domain(
        self,
        message: QueuedMessage,
        domain: str,
        rcpts: list[tuple[int, str]],
        payload: bytes,
    ) -> list[RcptOutcome]:
        def everyone(status: str, reply: str, enhanced: str) -> list[RcptOutcome]:
            return [RcptOutcome(p, a, status, reply, enhanced) for p, a in rcpts]

        try:
            requirement = await self._requirement(message, domain)
        except Exception as exc:  # the policy could not be decided (MTA-STS fetch...): later
            return everyone(DEFERRED, f"TLS policy lookup failed: {exc}", "4.7.5")
        hosts = await self._mail_hosts(domain)
        if hosts.null_mx:
            return everyone(
                BOUNCED, f"domain {domain} accepts no mail (null MX, RFC 7505)", "5.1.10"
            )
        if hosts.status == "nxdomain":
            return everyone(BOUNCED, f"domain {domain} does not exist (DNS NXDOMAIN)", "5.1.2")
        if hosts.status != "ok" or not hosts.hosts:
            detail = f"{hosts.status} {hosts.rcode} {hosts.detail}".strip()
            return everyone(DEFERRED, f"MX lookup for {domain} failed: {detail}", "4.4.3")
        names = [h for h in hosts.names if requirement.mx_allowed(h)]
        if requirement.testing:  # MTA-STS testing: say what enforce would have refused
            for host in hosts.names:
                if not requirement.mx_listed(host):
                    event(
                        log,
                        "mta_sts_testing",
                        message.id,
                        domain=domain,
                        mx=host,
                        problem="MX not listed in the policy",
                        policy=requirement.source,
                    )
        if not names:
            reason = f"no MX host of {domain} is allowed by {requirement.source}"
            return self._tls_failed(domain, rcpts, requirement, reason)
        return await self._try_hosts(
            message,
            domain,
            rcpts,
            payload,
            requirement,
            [(n, self.config.delivery.port) for n in names],
        )

    async def _deliver_bad_gateway(
        self, message: QueuedMessage, rcpts: list[tuple[int, str]], payload: bytes
    ) -> list[RcptOutcome]:
        routing = self.config.routing
        if not routing.bad_gateways:
            reason = "route bad_gateway but routing.bad_gateways is empty: kept in the queue"
            return [RcptOutcome(p, a, DEFERRED, reason, "4.3.5") for p, a in rcpts]
        # Verified TLS against the fleet's CA; a failure never falls back to direct delivery.
        requirement = TlsRequirement(VERIFY, None, "routing.bad_gateways", (), routing.internal_ca)
        outcomes = await self._try_hosts(
            message, "(bad gateway)", rcpts, payload, requirement, list(routing.bad_gateways)
        )
        for outcome in outcomes:
            if outcome.status == HELD:  # never held or bounced for TLS: stays deferred
                outcome.status = DEFERRED
        return outcomes

    async def _mail_hosts(self, domain: str) -> Any:
        """The resolver's answer, kept a few seconds: the resolver caches by TTL already, this
        saves the lookup's tasks for every message to the same domain."""
        now = time.monotonic()
        cached = self._route_cache.get(("mx", domain))
        if cached is not None and cached[0] > now:
            return cached[1]
        hosts = await self.resolver.mail_hosts(domain)
        if hosts.status == "ok":
            self._remember(("mx", domain), hosts, hosts.ttl, now)
        return hosts

    async def _targets(self, host: str, port: int) -> tuple[list[_Target], str]:
        try:
            ipaddress.ip_address(host)
            return [_Target(host, host, port)], ""
        except ValueError:
            pass
        now = time.monotonic()
        cached = self._route_cache.get(("a", host, port))
        if cached is not None and cached[0] > now:
            return cached[1], ""
        result = await self.resolver.addresses(host)
        if not result.ok:
            return [], f"address lookup for {host} failed: {result.status} {result.rcode}"
        targets = [_Target(host, r.address, port) for r in result.records]
        if not result.incomplete:
            self._remember(("a", host, port), targets, result.ttl, now)
        return targets, ""

    def _remember(self, key: tuple[Any, ...], value: Any, ttl: int, now: float) -> None:
        if len(self._route_cache) > ROUTE_CACHE_SIZE:
            self._route_cache.clear()
        self._route_cache[key] = (now + min(ttl, ROUTE_CACHE_SECONDS), value)

    async def _try_hosts(
        self,
        message: QueuedMessage,
        domain: str,
        rcpts: list[tuple[int, str]],
        payload: bytes,
        requirement: TlsRequirement,
        hosts: list[tuple[str, int]],
    ) -> list[RcptOutcome]:
        errors: list[str] = []
        tls_errors: list[str] = []
        last_relay = ""
        for host, port in hosts:
            targets, problem = await self._targets(host, port)
            if problem:
                errors.append(problem)
            for target in targets:
                last_relay = target.relay
                try:
                    outcomes = await self._deliver_to(message, target, rcpts, payload, requirement)
                except _HostFailed as exc:
                    (tls_errors if exc.tls else errors).append(f"{target.relay}: {exc.reply}")
                    continue
                if requirement.requires_tls and self._failures() is not None:
                    self._failures().record_success(domain, requirement.level)
                if requirement.testing and outcomes:
                    _report_mta_sts_testing(message, domain, target, requirement, outcomes[0].tls)
                return outcomes
        if tls_errors:
            return self._tls_failed(domain, rcpts, requirement, "; ".join(tls_errors[-3:]))
        reason = "; ".join(errors[-3:]) or "no host to deliver to"
        return [RcptOutcome(p, a, DEFERRED, reason, "4.4.1", relay=last_relay) for p, a in rcpts]

    def _failures(self) -> Any:
        return getattr(self.tls_policy, "failures", None)

    def _tls_failed(
        self,
        domain: str,
        rcpts: list[tuple[int, str]],
        requirement: TlsRequirement,
        detail: str,
    ) -> list[RcptOutcome]:
        reason = f"no TLS connection could be established ({requirement.describe()}): {detail}"
        if self._failures() is not None and domain != "(bad gateway)":
            self._failures().record_failure(domain, detail, requirement.level)  # intake's 5.7.10
        status = BOUNCED if requirement.on_failure == "reject" else HELD
        enhanced = "5.7.10" if status == BOUNCED else "4.7.10"
        return [RcptOutcome(p, a, status, reason, enhanced) for p, a in rcpts]

    # -- one connection -------------------------------------------------------------------

    def _context(self, requirement: TlsRequirement) -> ssl.SSLContext:
        key = (requirement.level, str(requirement.ca_bundle or ""))
        if key not in self._contexts:
            self._contexts[key] = requirement.ssl_context()
        return self._contexts[key]

    def _source(self, target: _Target) -> tuple[str, int] | None:
        source = self.config.gateway.source_address
        if not source:
            return None
        same_family = (
            ipaddress.ip_address(source).version == ipaddress.ip_address(target.ip).version
        )
        return (source, 0) if same_family else None

    def _session_key(self, target: _Target, requirement: TlsRequirement) -> tuple[Any, ...]:
        name = target.host if requirement.level == VERIFY else ""
        return (
            target.ip,
            target.port,
            self.config.gateway.source_address,
            requirement.level,
            str(requirement.ca_bundle or ""),
            name,
        )

    async def _deliver_to(
        self,
        message: QueuedMessage,
        target: _Target,
        rcpts: list[tuple[int, str]],
        payload: bytes,
        requirement: TlsRequirement,
    ) -> list[RcptOutcome]:
        key = self._session_key(target, requirement)
        async with self.pool.slot(target):
            session = self.pool.take(key)
            if session is not None:
                try:
                    return await self._use(session, message, rcpts, payload)
                except _StaleSession:
                    pass  # the far end closed the idle session: open a fresh one
            session = await self._open(target, requirement, key)
            try:
                return await self._use(session, message, rcpts, payload)
            except _StaleSession as exc:
                raise _HostFailed(f"connection lost: {exc}") from exc

    async def _use(
        self,
        session: _Session,
        message: QueuedMessage,
        rcpts: list[tuple[int, str]],
        payload: bytes,
    ) -> list[RcptOutcome]:
        """Run the transactions on one session and give it back to the pool.

        Lost before any DATA: a reused session raises :class:`_StaleSession` (the caller opens
        a fresh one), a fresh one :class:`_HostFailed` (next address).  Lost later: the
        recipients not yet done are deferred ("may be sent twice", as with any MTA).
        """
        outcomes: list[RcptOutcome] = []
        for start in range(0, len(rcpts), RCPTS_PER_TRANSACTION):
            chunk = rcpts[start : start + RCPTS_PER_TRANSACTION]
            try:
                outcomes += await self._transaction(session, message, chunk, payload)
            except (Exception, asyncio.CancelledError) as exc:
                if not isinstance(exc, _Lost):  # a bug or a stop: never reuse this session
                    _close_quietly(session)
                    raise
                lost = exc
                _close_quietly(session)
                if not outcomes and not lost.during_data:
                    if session.transactions > 0 or session.last_used > 0:
                        raise _StaleSession(lost.reply) from lost
                    raise _HostFailed(lost.reply) from lost
                remaining = rcpts[len(outcomes) :]
                return outcomes + [
                    RcptOutcome(
                        p,
                        a,
                        DEFERRED,
                        lost.reply,
                        "4.4.2",
                        session.target.host,
                        session.target.relay,
                        session.tls,
                    )
                    for p, a in remaining
                ]
            session.transactions += 1
        self.pool.give_back(session)
        return outcomes

    async def _open(
        self, target: _Target, requirement: TlsRequirement, key: tuple[Any, ...]
    ) -> _Session:
        delivery = self.config.delivery
        smtp = aiosmtplib.SMTP(
            hostname=target.ip,
            port=target.port,
            local_hostname=self.config.gateway.hostname,
            source_address=self._source(target),
            timeout=delivery.command_timeout,
            start_tls=False,
        )
        await self._connect_ehlo(smtp)
        tls = await self._starttls(smtp, target, requirement)
        self.pool.opened += 1
        session = _PipelinedSmtp(smtp) if smtp.supports_extension("pipelining") else smtp
        return _Session(session, key, target, tls, time.monotonic())

    async def _starttls(
        self, smtp: aiosmtplib.SMTP, target: _Target, requirement: TlsRequirement
    ) -> TlsOutcome:
        if not smtp.supports_extension("starttls"):
            if requirement.requires_tls:
                smtp.close()
                raise _HostFailed("STARTTLS not offered", tls=True)
            return NO_TLS
        try:
            await smtp.starttls(server_hostname=target.host, tls_context=self._context(requirement))
            await smtp.ehlo()
        except (smtp_errors.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
            smtp.close()
            text = (
                _reply_text(exc.code, exc.message)
                if isinstance(exc, smtp_errors.SMTPResponseException)
                else (str(exc) or type(exc).__name__)
            )
            if requirement.requires_tls:
                raise _HostFailed(f"TLS failed: {text}", tls=True) from exc
            # Opportunistic: the handshake failed, so deliver in cleartext (as Postfix does).
            return await self._reopen_cleartext(smtp, target, text)
        ssl_object = smtp.get_transport_info("ssl_object")
        return describe_tls(ssl_object, target.host, requirement)

    async def _reopen_cleartext(
        self, smtp: aiosmtplib.SMTP, target: _Target, why: str
    ) -> TlsOutcome:
        event(
            log, "tls_fallback", relay=target.relay, error=why, action="cleartext (opportunistic)"
        )
        await self._connect_ehlo(smtp)
        return NO_TLS

    async def _connect_ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        """Connect and greet; any failure closes the client and becomes ``_HostFailed``."""
        try:
            await smtp.connect(timeout=self.config.delivery.connect_timeout)
            await smtp.ehlo()
        except smtp_errors.SMTPResponseException as exc:
            smtp.close()
            raise _HostFailed(_reply_text(exc.code, exc.message)) from exc
        except (smtp_errors.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            raise _HostFailed(str(exc) or type(exc).__name__) from exc

    async def _transaction(
        self,
        session: _Session,
        message: QueuedMessage,
        rcpts: list[tuple[int, str]],
        payload: bytes,
    ) -> list[RcptOutcome]:
        if isinstance(session.smtp, _PipelinedSmtp):
            return await self._pipelined_transaction(session, message, rcpts, payload)
        smtp = session.smtp

        def outcome(pos: int, addr: str, code: int, text: str) -> RcptOutcome:
            reply = _reply_text(code, text)
            return RcptOutcome(
                pos,
                addr,
                _code_status(code),
                reply,
                dsn.status_from_reply(code, text),
                session.target.host,
                session.target.relay,
                session.tls,
                from_far_end=True,
            )

        options, encoding = self._mail_options(smtp, message, rcpts, payload)
        if options is None:
            reply = "the far end does not support SMTPUTF8, which this message needs"
            return [
                RcptOutcome(
                    p,
                    a,
                    BOUNCED,
                    reply,
                    "5.6.7",
                    session.target.host,
                    session.target.relay,
                    session.tls,
                )
                for p, a in rcpts
            ]
        try:
            await smtp.mail(message.sender, options=options, encoding=encoding)
        except smtp_errors.SMTPResponseException as exc:
            if exc.code == 421 or not smtp.is_connected:
                raise _Lost(_reply_text(exc.code, exc.message), during_data=False) from exc
            await _rset(smtp)
            return [outcome(p, a, exc.code, exc.message) for p, a in rcpts]
        except _DISCONNECTED as exc:
            raise _Lost(f"connection lost: {exc}", during_data=False) from exc
        accepted: list[tuple[int, str]] = []
        refused: list[RcptOutcome] = []
        try:
            for pos, addr in rcpts:
                try:
                    await smtp.rcpt(addr, encoding=encoding)
                    accepted.append((pos, addr))
                except smtp_errors.SMTPResponseException as exc:
                    refused.append(outcome(pos, addr, exc.code, exc.message))
        except _DISCONNECTED as exc:
            raise _Lost(f"connection lost: {exc}", during_data=False) from exc
        if not accepted:
            await _rset(smtp)
            return refused
        try:
            response = await smtp.data(payload)
        except smtp_errors.SMTPResponseException as exc:
            if smtp.is_connected:
                await _rset(smtp)
            return refused + [outcome(p, a, exc.code, exc.message) for p, a in accepted]
        except _DISCONNECTED as exc:
            raise _Lost(f"connection lost during DATA: {exc}", during_data=True) from exc
        return refused + [outcome(p, a, response.code, response.message) for p, a in accepted]

    async def _pipelined_transaction(
        self,
        session: _Session,
        message: QueuedMessage,
        rcpts: list[tuple[int, str]],
        payload: bytes,
    ) -> list[RcptOutcome]:
        """MAIL, RCPT..., DATA in one write; then the message; replies read in order."""
        pipe: _PipelinedSmtp = session.smtp
        target = session.target

        def outcome(pos: int, addr: str, code: int, text: str) -> RcptOutcome:
            reply = _reply_text(code, text)
            return RcptOutcome(
                pos, addr, _code_status(code), reply, dsn.status_from_reply(code, text),
                target.host, target.relay, session.tls, from_far_end=True,
            )  # fmt: skip

        def ours(status: str, reply: str, enhanced: str) -> list[RcptOutcome]:
            return [
                RcptOutcome(p, a, status, reply, enhanced, target.host, target.relay, session.tls)
                for p, a in rcpts
            ]

        options, encoding = self._mail_options(pipe, message, rcpts, payload)
        if options is None:
            return ours(BOUNCED, "the far end does not support SMTPUTF8, which this message "
                        "needs", "5.6.7")  # fmt: skip
        if not _clean_address(message.sender) or not all(_clean_address(a) for _, a in rcpts):
            return ours(BOUNCED, "address with control characters", "5.1.3")
        lines = [f"MAIL FROM:<{message.sender}>{''.join(' ' + o for o in options)}"]
        lines += [f"RCPT TO:<{addr}>" for _, addr in rcpts]
        commands = ("\r\n".join(lines) + "\r\nDATA\r\n").encode(encoding)
        timeout = self.config.delivery.command_timeout
        try:
            async with asyncio.timeout(timeout):
                pipe.write(commands)
                mail = await pipe.reply()
                rcpt_replies = [await pipe.reply() for _ in rcpts]
                data_reply = await pipe.reply()
        except (smtp_errors.SMTPServerDisconnected, TimeoutError, OSError) as exc:
            raise _Lost(f"connection lost: {exc}", during_data=False) from exc
        if mail[0] == 421:
            raise _Lost(_reply_text(*mail), during_data=False)
        accepted = [(p, a) for (p, a), r in zip(rcpts, rcpt_replies, strict=True) if r[0] < 300]
        refused = [
            outcome(p, a, *r) for (p, a), r in zip(rcpts, rcpt_replies, strict=True) if r[0] >= 300
        ]
        if mail[0] >= 300 or not accepted or data_reply[0] != 354:
            await self._abort(pipe, data_reply[0] == 354)
            if mail[0] >= 300:
                return [outcome(p, a, *mail) for p, a in rcpts]
            return refused + [outcome(p, a, *data_reply) for p, a in accepted]
        try:
            async with asyncio.timeout(timeout):
                pipe.write(data_block(payload))
                final = await pipe.reply()
        except (smtp_errors.SMTPServerDisconnected, TimeoutError, OSError) as exc:
            raise _Lost(f"connection lost during DATA: {exc}", during_data=True) from exc
        return refused + [outcome(p, a, *final) for p, a in accepted]

    async def _abort(self, pipe: _PipelinedSmtp, in_data: bool) -> None:
        """End a transaction that will not send its message (RSET; a 354 needs the dot)."""
        with contextlib.suppress(smtp_errors.SMTPException, OSError, TimeoutError):
            async with asyncio.timeout(self.config.delivery.command_timeout):
                if in_data:  # a far end that said 354 with no recipient: end it empty
                    pipe.write(b".\r\n")
                    await pipe.reply()
                await pipe.rset()

    @staticmethod
    def _mail_options(
        smtp: aiosmtplib.SMTP,
        message: QueuedMessage,
        rcpts: list[tuple[int, str]],
        payload: bytes,
    ) -> tuple[list[str] | None, str]:
        options: list[str] = []
        encoding = "ascii"
        if _needs_smtputf8(message.sender, [a for _, a in rcpts]) or message.facts.get("smtputf8"):
            if not smtp.supports_extension("smtputf8"):
                return None, encoding
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if not payload.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        return options, encoding

    # -- the attempt's result ---------------------------------------------------------------

    def _result(self, message: QueuedMessage, outcomes: list[RcptOutcome]) -> AttemptResult:
        delivery = self.config.delivery
        now = self.clock()
        expired = now - message.created_at >= delivery.max_lifetime
        if expired:
            for o in outcomes:
                if o.status in (DEFERRED, HELD):
                    days = delivery.max_lifetime / 86400
                    o.status = BOUNCED
                    o.enhanced = o.enhanced if o.enhanced.startswith("4.") else "4.4.7"
                    o.reply = f"message expired after {days:g} days in the queue; last: {o.reply}"
                    o.from_far_end = False
        updates = [self._update(o) for o in outcomes]
        attempts = message.attempts + 1
        backoff = min(delivery.retry_initial * 2 ** (attempts - 1), delivery.retry_max)
        next_attempt = min(now + backoff, message.created_at + delivery.max_lifetime)
        state, hold_reason = "deferred", None
        if any(o.status == HELD for o in outcomes):
            state, hold_reason = "held", HoldReason.TLS
            hold_retry = self.config.tls_policy.hold_retry
            next_attempt = min(now + hold_retry, message.created_at + delivery.max_lifetime)
        complete = len(outcomes) == len(message.pending) and all(
            o.status in (SENT, BOUNCED) for o in outcomes
        )
        return AttemptResult(
            message.id,
            updates,
            state,
            next_attempt,
            hold_reason,
            self._ndr(message, outcomes),
            complete,
        )

    @staticmethod
    def _update(o: RcptOutcome) -> RecipientUpdate:
        status = {SENT: "delivered", BOUNCED: "bounced"}.get(o.status, "pending")
        return RecipientUpdate(o.position, status, o.reply or None, o.remote_mta)

    def _ndr(self, message: QueuedMessage, outcomes: list[RcptOutcome]) -> NewMessage | None:
        bounced = [o for o in outcomes if o.status == BOUNCED]
        if not bounced or not message.sender or message.kind == "ndr":
            return None  # never to the null sender: no bounce loops
        failed = [
            dsn.FailedRecipient(
                address=o.address,
                status=o.enhanced or "5.0.0",
                diagnostic=o.reply if o.from_far_end else None,
                remote_mta=o.remote_mta,
                reason="" if o.from_far_end else o.reply,
                last_attempt=self.clock(),
            )
            for o in bounced
        ]
        data = dsn.make_ndr(
            hostname=self.config.gateway.hostname,
            sender=message.sender,
            original=message.data,
            failed=failed,
            queue_id=message.id,
            arrival=message.created_at,
            facts=message.facts,
        )
        return NewMessage("", [message.sender], data, kind="ndr", facts={"ndr_for": message.id})

    def _log_attempt(
        self, message: QueuedMessage, outcomes: list[RcptOutcome], took: float, state: str
    ) -> None:
        """One line per attempt and outcome: recipients with the same status, relay, TLS and
        reply share a line (``delivery`` event, see gateway/log.py)."""
        delay = self.clock() - message.created_at
        groups: dict[tuple[str, str, TlsOutcome, str], list[str]] = {}
        for o in outcomes:
            groups.setdefault((o.status, o.relay, o.tls, o.reply), []).append(o.address)
        for (status, relay, tls, reply), addresses in groups.items():
            fields: dict[str, Any] = {
                "to": ",".join(f"<{a}>" for a in addresses),
                "relay": relay or "none",
                "tls": tls.version or "none",
            }
            if tls.encrypted:
                fields["cipher"] = tls.cipher
                fields["verify"] = tls.verification + (f" ({tls.detail})" if tls.detail else "")
            fields.update(
                delay=f"{delay:.2f}",
                attempt_time=f"{took:.3f}",
                attempts=message.attempts + 1,
                status=status,
                reply=reply,
            )
            if message.route == "bad_gateway":
                fields["route"] = "bad_gateway"
            level = logging.WARNING if status in (BOUNCED, HELD) else logging.INFO
            event(log, "delivery", message.id, level=level, **fields)
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                for o in outcomes:
                    self.metrics.delivery_outcome(o.status)


def _report_mta_sts_testing(
    message: QueuedMessage, domain: str, target: _Target, req: TlsRequirement, tls: TlsOutcome
) -> None:
    """MTA-STS testing: the mail went, but say so if enforce would have refused the session."""
    if tls.verification == "trusted":
        return
    problem = f"TLS {tls.verification} {tls.detail}".strip() if tls.encrypted else "no TLS"
    event(log, "mta_sts_testing", message.id, domain=domain, mx=target.host, problem=problem,
          policy=req.source)  # fmt: skip


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(smtp_errors.SMTPException, OSError, TimeoutError):
        await smtp.rset()
