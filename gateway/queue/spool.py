"""The relay's and the operator's handles on the spool database.

:class:`Spool` is the relay's: asynchronous, every write goes through the group-commit writer
thread (:mod:`gateway.queue.writer`), reads run on one reader thread.  ``smg queue``'s is
:class:`gateway.queue.admin.SpoolAdmin`: plain synchronous SQLite on the same database, safe
while the relay runs.

Message states (:class:`MessageState`): ``active`` (new, or being delivered), ``deferred``
(waiting for ``next_attempt``), ``held`` (an operator's hold, or ``hold_reason = "tls"``:
retried on the TLS hold schedule).  A message leaves the database once none of its recipients
is pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.queue import backlog, store
from gateway.queue.changes import announce_change
from gateway.queue.errors import (
    SpoolDamaged,
    SpoolFull,
    SpoolUnavailable,
    UnknownMessage,
    unavailable,
)
from gateway.queue.model import (
    AttemptOutcome,
    AttemptResult,
    DueMessage,
    HoldReason,
    MessageKind,
    MessageState,
    NewMessage,
    QueuedMessage,
    Recipient,
    Route,
)
from gateway.queue.owners import owner_alive, process_owner
from gateway.queue.store import BUSY_TIMEOUT, DB_NAME
from gateway.queue.writer import STOP, Job, Operation, Writer, file_lock

__all__ = [
    "Spool",
    "SpoolDamaged",
    "SpoolFull",
    "SpoolUnavailable",
    "UnknownMessage",
    "resolve_path",
]

log = logging.getLogger("smg.spool")


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``gateway.spool`` is a directory; the database is ``queue.sqlite`` inside it.  A path
    ending in ``.sqlite`` or ``.db`` is taken as the database itself (tests)."""
    p = Path(path)
    if p.suffix in (".sqlite", ".db"):
        return p
    return p / DB_NAME


RUNBOOK = "docs/queue.md, section 'Damaged spool'"
# A spool larger than this is checked after the relay accepts mail, not before: quick_check
# reads every page (about 2 s per GiB warm, far more cold), and a big backlog must not keep
# the relay from accepting for minutes after a restart.
BACKGROUND_CHECK_SIZE = 256 << 20
DESTINATION_PAGE = 256  # destinations read per step of the due scan


def _damaged(db_path: Path, said: str) -> SpoolDamaged:
    return SpoolDamaged(
        f"spool database {db_path} is damaged; SQLite says: {said}. The relay does not run on "
        f"a damaged spool: stop it, keep a copy and recover the mail as {RUNBOOK} says"
    )


def _check_integrity(conn: sqlite3.Connection, db_path: Path) -> None:
    """Raise :class:`SpoolDamaged` unless SQLite's quick_check passes."""
    try:
        problems = store.quick_check(conn)
    except sqlite3.DatabaseError as exc:  # too damaged to check: that is the answer
        raise _damaged(db_path, str(exc)) from exc
    if problems is not None:
        raise _damaged(db_path, problems)


class Spool:
    """The relay's asynchronous handle on the spool database (see the module docstring)."""

    def __init__(self, path: Path, writer: Writer, reader: sqlite3.Connection) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._read_executor = concurrent.futures.ThreadPoolExecutor(1, "smg-spool-reader")
        self._listeners: list[Callable[[QueuedMessage], None]] = []
        self._claimable: set[str] = {process_owner()}  # owners whose active mail we may take
        self._closed = False
        self._cursor: str | None = None  # the due scan's last destination (round robin)
        self.check_later = False  # the start check was left for check() (a big spool)

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], busy_timeout: float = BUSY_TIMEOUT, check: bool = False
    ) -> Spool:
        """Open (and create) the spool database under ``path`` (``gateway.spool``).

        ``check``: run SQLite's quick_check on an existing database first and raise
        :class:`SpoolDamaged` if it fails (the relay at start: it must not run on a damaged
        spool, where a later write could spread the damage or lose mail).  On a database
        larger than BACKGROUND_CHECK_SIZE the check is left to :meth:`check` and
        ``check_later`` is set: the caller runs it while accepting mail."""
        db_path = resolve_path(path)
        return await asyncio.to_thread(cls._open_sync, db_path, busy_timeout, check)

    @classmethod
    def _open_sync(cls, db_path: Path, busy_timeout: float, check: bool = False) -> Spool:
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Several workers start at once: switching a new database to WAL takes a lock that
            # SQLite does not wait for, so they take turns on the lock file here.
            with file_lock(db_path.with_suffix(".lock")):
                size = db_path.stat().st_size if db_path.exists() else 0
                later = check and size > BACKGROUND_CHECK_SIZE
                conn = store.connect(db_path, busy_timeout)
                try:
                    if check and size > 0 and not later:
                        _check_integrity(conn, db_path)
                    conn.execute("BEGIN IMMEDIATE")
                    store.create_schema(conn)
                    conn.execute("COMMIT")
                finally:
                    conn.close()
                reader = store.connect(db_path, busy_timeout)
        except SpoolDamaged:
            raise
        except sqlite3.DatabaseError as exc:
            # Not an OperationalError (locked, read-only, full): the file itself is bad.
            if check and not isinstance(exc, sqlite3.OperationalError):
                raise _damaged(db_path, str(exc)) from exc
            raise unavailable(f"cannot open spool {db_path}", exc) from exc
        except OSError as exc:
            raise unavailable(f"cannot open spool {db_path}", exc) from exc
        writer = Writer(db_path, busy_timeout)
        writer.start()
        spool = cls(db_path, writer, reader)
        spool.check_later = later
        return spool

    async def check(self) -> None:
        """SQLite's quick_check on a connection of its own (read-only: it never blocks the
        writer); raises :class:`SpoolDamaged`."""

        def run() -> None:
            conn = store.connect(self.path, readonly=True)
            try:
                _check_integrity(conn, self.path)
            finally:
                conn.close()

        await asyncio.to_thread(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.jobs.put(STOP)
        await asyncio.to_thread(self._writer.join, 30)
        log.info(
            "spool closed: %d operations in %d commits",
            self._writer.operations,
            self._writer.commits,
        )
        self._read_executor.shutdown(wait=True)
        with contextlib.suppress(sqlite3.Error):
            self._reader.close()

    # -- writing ------------------------------------------------------------------------------

    def submit(
        self, op: Operation, on_commit: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``op`` for the next group commit; the future resolves after the commit."""
        if self._closed:
            raise SpoolUnavailable("the spool is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._writer.jobs.put(Job(op, future, loop, on_commit))
        return future

    def add_listener(self, callback: Callable[[QueuedMessage], None]) -> None:
        """``callback(message)`` runs on the event loop for each new active message right
        after it is durable (delivery's in-memory hand-off)."""
        self._listeners.append(callback)

    async def enqueue(
        self,
        mail_from: str,
        rcpt_tos: Sequence[str],
        data: bytes,
        *,
        route: Route = Route.DIRECT,
        state: MessageState = MessageState.ACTIVE,
        client_ip: str | None = None,
        helo: str | None = None,
        facts: dict[str, Any] | None = None,
        kind: MessageKind = MessageKind.MAIL,
        hold_reason: HoldReason | None = None,
        tenant: str | None = None,
    ) -> str:
        """Store one message durably and return its queue id (raises SpoolUnavailable)."""
        if state == MessageState.HELD and hold_reason is None:
            hold_reason = HoldReason.POLICY
        new = NewMessage(
            mail_from,
            list(rcpt_tos),
            bytes(data),
            route,
            state,
            kind,
            hold_reason,
            client_ip,
            helo,
            dict(facts or {}), tenant,
        )  # fmt: skip
        now = time.time()

        def notify(queue_id: str) -> None:
            if state != MessageState.ACTIVE or not self._listeners:
                return
            recipients = [Recipient(a, i) for i, a in enumerate(new.recipients)]
            message = QueuedMessage(
                queue_id,
                new.sender,
                recipients,
                new.data,
                route,
                state,
                None,
                kind,
                now,
                now,
                client_ip=client_ip,
                helo=helo,
                facts=new.facts,
                tenant=tenant,
            )
            for callback in self._listeners:
                callback(message)

        return await self.submit(lambda conn: store.insert_message(conn, new, now), notify)

    async def begin_attempt(self, queue_id: str) -> bool:
        """Claim a message found by :meth:`due` (see :func:`begin_attempt`)."""
        now = time.time()
        claimable = tuple(self._claimable)
        return await self.submit(lambda conn: store.begin_attempt(conn, queue_id, now, claimable))

    async def finish_attempt(self, result: AttemptResult) -> AttemptOutcome:
        now = time.time()
        ndr = result.ndr

        def op(conn: sqlite3.Connection) -> AttemptOutcome:
            return store.finish_attempt(conn, result, now)

        def notify(outcome: AttemptOutcome) -> None:
            if outcome.ndr_id is None or ndr is None or not self._listeners:
                return
            recipients = [Recipient(a, i) for i, a in enumerate(ndr.recipients)]
            message = QueuedMessage(
                outcome.ndr_id,
                ndr.sender,
                recipients,
                ndr.data,
                ndr.route,
                ndr.state,
                None,
                ndr.kind,
                now,
                now,
                facts=dict(ndr.facts),
            )
            for callback in self._listeners:
                callback(message)

        return await self.submit(op, notify)

    async def hold(self, queue_id: str) -> bool:
        held = bool(await self.submit(lambda conn: store.hold(conn, queue_id)))
        announce_change(self.path.parent)
        return held

    async def release(self, queue_id: str) -> bool:
        now = time.time()
        return bool(await self.submit(lambda conn: store.release(conn, queue_id, now)))

    async def delete(self, queue_id: str) -> bool:
        deleted = bool(await self.submit(lambda conn: store.delete(conn, queue_id)))
        announce_change(self.path.parent)
        return deleted

    async def flush(self) -> int:
        now = time.time()
        return int(await self.submit(lambda conn: store.flush(conn, now)))

    # -- reading ------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()

        def run() -> Any:
            try:
                return fn(self._reader)
            except sqlite3.Error as exc:
                raise unavailable(f"spool {self.path}", exc) from exc

        return await loop.run_in_executor(self._read_executor, run)

    async def load(self, queue_id: str, with_data: bool = True) -> QueuedMessage | None:
        return await self._read(lambda conn: store.load_message(conn, queue_id, with_data))

    async def load_own(self, queue_id: str) -> QueuedMessage | None:
        """A message this process already has (stored by it, or found active for it), if it
        still has it: None if an operator held, released or deleted it meanwhile.  A read
        only, where :meth:`begin_attempt` would be a write."""
        owner = process_owner()
        return await self._read(lambda conn: store.load_message(conn, queue_id, owned_by=owner))

    async def due(
        self,
        limit: int,
        now: float | None = None,
        rooms: dict[str, int] | None = None,
        room: int | None = None,
    ) -> list[str]:
        """Ids of up to ``limit`` messages due for an attempt by this process, at most
        ``rooms[d]`` of destination ``d`` (0: skip it), ``room`` of any other (see
        :meth:`due_by_destination`)."""
        given = rooms or {}
        default = limit if room is None else room
        found = await self.due_by_destination(limit, lambda d: given.get(d, default), now)
        return [due.queue_id for due in found]

    async def due_by_destination(
        self, limit: int, room: Callable[[str], int], now: float | None = None
    ) -> list[DueMessage]:
        """Up to ``limit`` messages due for an attempt by this process (id, destination, size),
        taken destination by destination, round robin from where the last scan stopped: at
        most ``room(d)`` of destination ``d`` (0: skip it, it is paused or full).  Each
        destination costs index seeks, so a paused destination with a million due messages
        costs the others nothing (see :mod:`gateway.queue.backlog`)."""
        when = time.time() if now is None else now

        def query(conn: sqlite3.Connection) -> list[DueMessage]:
            me = process_owner()
            gone = {o for o in store.active_owners(conn) if o != me and not owner_alive(o)}
            self._claimable = {me, *gone}
            return self._scan(conn, when, limit, room)

        return await self._read(query)

    def _scan(
        self, conn: sqlite3.Connection, now: float, limit: int, room: Callable[[str], int]
    ) -> list[DueMessage]:
        found: list[DueMessage] = []
        start, after, wrapped = self._cursor, self._cursor, self._cursor is None
        last = start
        while len(found) < limit:
            names = backlog.destinations(conn, after, DESTINATION_PAGE)
            if wrapped and start is not None:
                names = [n for n in names if n <= start]
            if not names:
                if wrapped:
                    break
                wrapped, after = True, None
                continue
            for name in names:
                last = name
                take = min(room(name), limit - len(found))
                if take > 0:
                    rows = backlog.due_for(conn, name, now, take, tuple(self._claimable))
                    found += [DueMessage(qid, name, size, owner) for qid, size, owner in rows]
                if len(found) >= limit:
                    break
            after = names[-1]
            if wrapped and start is not None and after >= start:
                break
        self._cursor = last
        return found

    async def state_of(self, queue_id: str) -> MessageState | None:
        def query(conn: sqlite3.Connection) -> MessageState | None:
            row = conn.execute("SELECT state FROM messages WHERE id = ?", (queue_id,)).fetchone()
            return MessageState(row[0]) if row else None

        return await self._read(query)

    async def list(self) -> list[QueuedMessage]:
        return await self._read(store.list_messages)

    async def counts(self) -> dict[str, int]:
        return await self._read(store.counts)

    @property
    def stats(self) -> dict[str, int]:
        """Commits and operations so far (how well group commit groups)."""
        return {"commits": self._writer.commits, "operations": self._writer.operations}
