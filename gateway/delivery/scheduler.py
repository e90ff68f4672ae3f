"""The delivery scheduler: takes due messages from the spool and attempts them.

New messages come by an in-memory hand-off from :meth:`Spool.enqueue` (delivered at once);
everything else (retries, released holds, messages left active by a crash) is found by polling
the spool every ``delivery.scan_interval``.  At most ``delivery.concurrency`` messages are in an
attempt at a time.  Every attempt ends in one spool operation (:meth:`Spool.finish_attempt`)
that records each recipient's outcome, queues the NDR for the failed ones in the same
transaction, and moves the message on: removed (nothing pending), ``deferred`` with exponential
backoff, or ``held`` (TLS could not be had).  Before a message leaves directly, the internal
verdict header is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.budget import DataBudget
from gateway.config import Config
from gateway.delivery.client import Dialer, strip_header, wire_bytes
from gateway.delivery.outcome import (
    DEFERRED,
    RcptOutcome,
    Rcpts,
    attempt_result,
    everyone,
    log_attempt,
)
from gateway.delivery.pool import ConnectionPool
from gateway.delivery.routing import Router
from gateway.delivery.shaping import Shaper
from gateway.dns import Resolver
from gateway.log import event
from gateway.metrics import Metrics
from gateway.queue.changes import ChangeSignal, Signature
from gateway.queue.model import (
    AttemptOutcome,
    AttemptResult,
    MessageState,
    QueuedMessage,
    Route,
)
from gateway.queue.owners import process_owner
from gateway.queue.spool import Spool, SpoolUnavailable
from gateway.queue.unpause import UnpauseRequests
from gateway.tls.policy import TlsPolicy

log = logging.getLogger("smg.delivery")

HANDOFF_BACKLOG = 10000  # messages waiting in memory at most; beyond, the poll finds them
# Bytes of message data the hand-off queue keeps in memory; beyond, a message is handed off by
# its id and loaded from the spool when a worker takes it (50 large messages queued at once
# would otherwise all stay in memory until their attempts).
HANDOFF_MEMORY = 16 << 20
BUDGET_WAIT = 3600.0  # an attempt waits this long at most for the memory budget, then later
RECORD_TRIES = 15  # writes of an attempt's result while the spool is unavailable (~6 min)
PARKED_MAX = 10000  # hand-offs waiting per full destination (data within HANDOFF_MEMORY)


@dataclass
class _Work:
    queue_id: str
    message: QueuedMessage | None  # None: found by the poll, loaded from the spool
    destination: str = ""  # the spool's destination column (what shaping goes by)
    changes: Signature = None  # of spool.changes at the hand-off (see gateway.queue.changes)
    size: int = 0  # of the message's data (what the attempt reserves of the memory budget)
    ours: bool = False  # by id and already active for this process: loaded without a claim

    @property
    def kept(self) -> int:
        """Bytes of data this hand-off keeps in memory (counted in ``_handoff_bytes``)."""
        return self.size if self.message is not None else 0


class Delivery:
    """The scheduler and SMTP client.  ``await start()`` once the spool is open; ``await
    stop()`` on shutdown (attempts in progress are abandoned; their messages are still
    ``active`` in the spool and are retried at the next start)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        resolver: Resolver,
        tls_policy: TlsPolicy | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        budget: DataBudget | None = None,
    ) -> None:
        """``budget``: the process's memory budget for message bytes (shared with the
        intake); an attempt takes its message's size from it first."""
        self._config = config
        self.spool = spool
        self.resolver = resolver
        self.tls_policy = tls_policy
        self.metrics = metrics
        self.clock = clock
        section = config.delivery
        self.concurrency = max(1, section.concurrency)
        self.pool = ConnectionPool(section.connection_reuse, section.max_connections_per_host)
        self.dialer = Dialer(config)
        self.router = Router(lambda: self._config, resolver, tls_policy, self.pool, self.dialer)
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._known: dict[str, str] = {}  # ids waiting (queue, parked) or in an attempt
        self._known_per: Counter[str] = Counter()  # ... per destination
        self.shaper = Shaper(section)
        self._unpause = UnpauseRequests(spool.path.parent)  # smg queue flush ends pauses
        self._changes = ChangeSignal(spool.path.parent)  # holds and deletes from outside
        self._parked: dict[str, deque[_Work]] = {}  # work of full destinations, in order
        self._capped: set[str] = set()  # destinations with more due than the last poll took
        self._cooldown: dict[str, float] = {}  # ids whose result could not be recorded
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # the workers' queue is short again (see _poll_loop)
        self.attempts = 0
        self.budget = budget or DataBudget(config.gateway.data_memory)
        self._handoff_bytes = 0  # data kept by hand-offs waiting (in _queue or parked)

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
        self.dialer.config = config
        self.router.forget()
        self.pool.reuse = config.delivery.connection_reuse
        self.shaper.configure(config.delivery)

    # -- scheduling -----------------------------------------------------------------------

    def _remember(self, queue_id: str, destination: str) -> None:
        self._known[queue_id] = destination
        self._known_per[destination] += 1

    def _forget(self, queue_id: str) -> None:
        destination = self._known.pop(queue_id, None)
        if destination is not None:
            self._known_per[destination] -= 1
            if self._known_per[destination] <= 0:
                del self._known_per[destination]

    def _handoff(self, message: QueuedMessage) -> None:
        if message.id in self._known or self._queue.qsize() >= HANDOFF_BACKLOG:
            return  # already scheduled, or too many in memory: the poll will find it
        destination = message.destination
        if self.shaper.paused(destination):
            return  # stays active (ours); the poll takes it when the pause is over
        self._remember(message.id, destination)
        size = len(message.data)
        if self._handoff_bytes + size > HANDOFF_MEMORY:
            # By id: loaded from the spool at its turn.
            self._queue.put_nowait(_Work(message.id, None, destination, size=size, ours=True))
            return
        self._handoff_bytes += size
        changes = self._changes.signature()
        self._queue.put_nowait(_Work(message.id, message, destination, size=size, changes=changes))

    async def _poll_loop(self) -> None:
        interval = max(0.05, self.config.delivery.scan_interval)
        while True:
            backlog = False
            for destination in self._unpause.new():
                self.shaper.unpause(destination)
            with contextlib.suppress(Exception):
                backlog = await self._poll_once()
            if backlog:
                # More is due than one search returned (a restart with a full queue, a flush):
                # search again as soon as the workers have room, not a whole interval later.
                await self._room.wait()
                continue
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for swallows a cancellation
            # that comes together with the wake-up, and the stop would then hang on this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            self.shaper.forget_idle()

    async def _poll_once(self) -> bool:
        """Queue due messages for the workers; True if there may be more due right now.
        Per destination at most what shaping allows on top of what is already known (the
        spool returns our own active messages too), nothing of a paused one."""
        if self._queue.qsize() >= self.concurrency:
            return False  # the workers have enough to do; keeps the poll cheap under load
        limit = len(self._known) + 2 * self.concurrency
        known, shaper = dict(self._known_per), self.shaper
        asked: dict[str, int] = {}
        waiting: set[str] = set()

        def room(destination: str) -> int:
            if self._parked.get(destination):
                # Its next attempts already wait in memory: searching would only read its
                # known messages again (a thousand rows per attempt on a full destination).
                waiting.add(destination)
                return 0
            asked[destination] = known.get(destination, 0) + shaper.room(destination)
            return asked[destination]

        try:
            due = await self.spool.due_by_destination(limit, room, self.clock())
        except SpoolUnavailable as exc:
            log.warning("spool poll failed: %s", exc)
            return False
        now = self.clock()
        for queue_id, until in list(self._cooldown.items()):
            if until <= now:
                del self._cooldown[queue_id]
        added = 0
        taken: Counter[str] = Counter()
        me = process_owner()
        for found in due:
            queue_id, destination = found.queue_id, found.destination
            taken[destination] += 1
            if queue_id not in self._known and queue_id not in self._cooldown:
                self._remember(queue_id, destination)
                ours = found.owner == me
                self._queue.put_nowait(
                    _Work(queue_id, None, destination, size=found.size, ours=ours)
                )
                added += 1
        # A destination that filled its room may have more due: search again as soon as one
        # of its attempts ends and nothing of it waits in memory (a drain after a pause ramps
        # up with its concurrency).
        self._capped = {d for d, n in taken.items() if n >= asked.get(d, 0) > 0} | waiting
        if len(due) >= limit and added:
            self._room.clear()
            return True
        return False

    def _park(self, work: _Work) -> None:
        """A destination paused or full: its message waits out of the workers' way (with its
        data, if the hand-off had it: counted in ``_handoff_bytes``, so a full destination
        does not make every message a second read of the spool), or is left to the poll."""
        destination = work.destination
        parked = self._parked.setdefault(destination, deque())
        if self.shaper.paused(destination):
            self._drop(work)  # the poll finds it again after the pause
            return
        if len(parked) >= PARKED_MAX:
            self._drop(work)
            self._capped.add(destination)  # the poll searches once the parked ones are gone
            return
        parked.append(work)
        wait = self.shaper.wait(destination)
        if wait > 0:  # the rate, not the concurrency: nothing ends to wake it
            asyncio.get_running_loop().call_later(wait, self._unpark, destination)

    def _unpark(self, destination: str) -> None:
        parked = self._parked.get(destination)
        if not parked:
            self._parked.pop(destination, None)
            return
        if self.shaper.paused(destination):
            while parked:
                self._drop(parked.popleft())
            return
        for _ in range(min(len(parked), self.shaper.room(destination))):
            self._queue.put_nowait(parked.popleft())
        if parked and self.shaper.wait(destination) > 0:
            asyncio.get_running_loop().call_later(
                self.shaper.wait(destination), self._unpark, destination
            )

    def _drop(self, work: _Work) -> None:
        """Let go of a hand-off (and its data): its message stays active in the spool."""
        self._handoff_bytes -= work.kept
        self._forget(work.queue_id)

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
            if not self.shaper.start(work.destination):
                self._park(work)  # paused or full: never holds a worker
                continue
            self._handoff_bytes -= work.kept  # the attempt's budget reservation takes over
            try:
                await self._within_budget(work)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue_id=%s delivery attempt failed unexpectedly", work.queue_id)
                await self._defer_after_bug(work.queue_id)
            finally:
                self._forget(work.queue_id)
                self.shaper.finish(work.destination)
                self._unpark(work.destination)
                if work.destination in self._capped and not self._parked.get(work.destination):
                    self._wake.set()

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
                    queue_id,
                    [],
                    MessageState.DEFERRED,
                    self.clock() + self.config.delivery.retry_initial,
                )
            )

    async def _claim(self, work: _Work) -> QueuedMessage | None:
        """The message to attempt, or None if an operator held or deleted it meanwhile."""
        if work.message is None:
            if work.ours:  # stored by us (and not handed off whole) or left active for us
                return await self.spool.load_own(work.queue_id)
            if not await self.spool.begin_attempt(work.queue_id):
                return None
            return await self.spool.load(work.queue_id)
        # A hand-off is read again only if someone held or deleted messages meanwhile.
        changed = work.changes != self._changes.signature()
        if changed and await self.spool.state_of(work.queue_id) != MessageState.ACTIVE:
            return None
        return work.message

    async def _within_budget(self, work: _Work) -> None:
        """Attempt ``work`` once its message's bytes fit in the memory budget (the usual
        case: at once); if they never do, the poll finds the message again later."""
        reservation = self.budget.reservation()
        if not await reservation.take(work.size, BUDGET_WAIT):
            return
        try:
            await self._process(work)
        finally:
            reservation.release()

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
        result = attempt_result(self.config, self.clock(), message, outcomes)
        outcome = await self._record(result)
        log_attempt(message, outcomes, time.monotonic() - started, self.clock, self.metrics)
        if outcome.ndr_id:
            event(log, "ndr", message.id, ndr=outcome.ndr_id, to=f"<{message.sender}>",
                  **({"tenant": message.tenant} if message.tenant else {}))  # fmt: skip

    async def attempt(self, message: QueuedMessage) -> list[RcptOutcome]:
        """Try every pending recipient once; returns one outcome per recipient."""
        payload = wire_bytes(message.data)
        if message.route == Route.DIRECT:
            payload = strip_header(payload, self.config.routing.verdict_header)
            groups: dict[str, Rcpts] = {}
            for rcpt in message.pending:
                domain = rcpt.address.rpartition("@")[2].lower()
                groups.setdefault(domain, []).append((rcpt.position, rcpt.address))
            tasks = [
                self._shaped(message, domain, rcpts, payload) for domain, rcpts in groups.items()
            ]
        else:
            rcpts = [(r.position, r.address) for r in message.pending]
            tasks = [self.router.deliver_bad_gateway(message, rcpts, payload)]
        if len(tasks) == 1:  # the usual case: no extra tasks
            return await tasks[0]
        results = await asyncio.gather(*tasks)
        return [outcome for group in results for outcome in group]

    async def _shaped(
        self, message: QueuedMessage, domain: str, rcpts: Rcpts, payload: bytes
    ) -> list[RcptOutcome]:
        """One domain's recipients, unless the domain is paused (deferred at once, no
        connection); what the far end said moves its shaping (see :mod:`shaping`)."""
        pause = self.shaper.paused(domain)
        if pause:
            reason = self.shaper.reason(domain)
            text = f"destination {domain} paused for {pause:.0f}s after: {reason}"
            return everyone(rcpts, DEFERRED, text, "4.4.5")
        outcomes = await self.router.deliver_domain(message, domain, rcpts, payload)
        self.shaper.record(domain, outcomes)
        return outcomes
