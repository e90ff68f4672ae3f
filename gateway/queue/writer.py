"""The spool's writer thread: group commit.

The relay never writes from the event loop.  Every write is an *operation* (a function of a
connection) handed to one writer thread, which takes everything that is pending, runs it in one
transaction (a savepoint per operation, so one bad operation fails alone) and commits once: one
fsync covers every message that arrived meanwhile.  The caller awaits a future that is resolved
only after the commit returned, so ``enqueue`` returning means durable.

A disk that is full, a spool that is not writable, or any other SQLite I/O error fails every
operation of that transaction with :class:`SpoolUnavailable` (:class:`SpoolFull` for a full
disk): the intake answers 4xx and the client keeps its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.queue.errors import unavailable
from gateway.queue.store import connect

log = logging.getLogger("smg.spool")

MAX_BATCH = 2000  # operations per transaction at most; the rest go into the next one
# Commit delay: while operations come from several callers at once (the last commit held more
# than one and ended less than BUSY_GAP ago), the writer waits for up to COMMIT_DELAY until
# COMMIT_TARGET operations are pending before it commits, so that one commit covers several.
# Each commit costs the relay about as much CPU as the operations in it (WAL frames of the
# shared index pages, locks, the fsync, waking the event loop, two thread switches).  In the
# pipeline bench (16 clients, about 200 msg/s, about 2 operations per commit without it) the
# writer thread's CPU went from about 0.5 to 0.35-0.45 ms per message.  A relay whose commits
# fill up by themselves waits for nothing (the relay bench: 6-16 per commit; a fixed 8 ms wait
# cost it 15-25 % of its msg/s), and neither does a lone client nor an idle relay; a 250 still
# waits for the commit (fsync) of its message.
COMMIT_DELAY = 0.008
COMMIT_TARGET = 4
BUSY_GAP = 0.05


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` for the block (no lock if the file cannot be made)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


Operation = Callable[[sqlite3.Connection], Any]
STOP = object()  # put on the jobs queue: the thread ends after what came before


@dataclass
class Job:
    op: Operation
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    on_commit: Callable[[Any], None] | None = None


class Writer(threading.Thread):
    """Runs operations in batches: one transaction, one commit (one fsync) per batch."""

    def __init__(self, path: Path, busy_timeout: float) -> None:
        super().__init__(name="smg-spool-writer", daemon=True)
        self.path = path
        self.busy_timeout = busy_timeout
        self.jobs: queue.SimpleQueue[Job | object] = queue.SimpleQueue()
        self.conn: sqlite3.Connection | None = None
        self.commits = 0
        self.operations = 0
        self.commit_delay = COMMIT_DELAY
        self._lock_fd: int | None = None
        self._last_commit = 0.0  # time.monotonic() when the last batch ended
        self._last_batch = 0  # operations in it

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is STOP:
                break
            batch: list[Job] = [job]  # type: ignore[list-item]
            stop_after = self._busy() and self._gather(batch)
            with self._exclusive():
                # Taken after the wait for the lock: what arrived meanwhile joins this commit.
                if not stop_after:
                    stop_after = self._drain(batch)
                self._run_batch(batch)
            self._last_commit = time.monotonic()
            self._last_batch = len(batch)
            if stop_after:
                break
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _busy(self) -> bool:
        """Several callers at once just now: worth waiting for more (see COMMIT_DELAY)."""
        if not self.commit_delay or self._last_batch < 2:
            return False
        return time.monotonic() - self._last_commit < BUSY_GAP

    def _gather(self, batch: list[Job]) -> bool:
        """Wait (up to commit_delay) until COMMIT_TARGET operations are there; True on STOP."""
        deadline = time.monotonic() + self.commit_delay
        while len(batch) < COMMIT_TARGET:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                more = self.jobs.get(timeout=remaining)
            except queue.Empty:
                return False
            if more is STOP:
                return True
            batch.append(more)  # type: ignore[arg-type]
        return False

    def _drain(self, batch: list[Job]) -> bool:
        """Add what is pending to ``batch`` (up to MAX_BATCH); True on STOP."""
        while len(batch) < MAX_BATCH:
            try:
                more = self.jobs.get_nowait()
            except queue.Empty:
                break
            if more is STOP:
                return True
            batch.append(more)  # type: ignore[arg-type]
        return False

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Several relay processes on one spool (gateway.workers): take turns on a lock file.
        SQLite's own busy handler would make a waiting writer sleep in steps of milliseconds;
        flock wakes it the moment the other commit is done."""
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(
                    self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600
                )
            except OSError:
                yield  # no lock file (read-only directory): SQLite's locking alone
                return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _run_batch(self, batch: list[Job]) -> None:
        results: list[tuple[Job, Any, BaseException | None]] = []
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for job in batch:
                    results.append(self._run_one(conn, job))
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self.commits += 1
            self.operations += len(batch)
        except Exception as exc:  # sqlite3.Error, OSError, or a bug: the thread must live on
            # Nothing of this batch is on disk: every caller learns so.  The connection may be
            # in a bad state after an I/O error: open a fresh one for the next batch.
            self._drop_connection()
            error = unavailable(f"spool {self.path}", exc)
            results = [(job, None, error) for job in batch]
        _resolve(results)

    @staticmethod
    def _run_one(conn: sqlite3.Connection, job: Job) -> tuple[Job, Any, BaseException | None]:
        conn.execute("SAVEPOINT op")
        try:
            value = job.op(conn)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError) as exc:
            return job, None, _undo(conn, exc)
        except sqlite3.Error:
            raise  # I/O, disk full, locked: the whole transaction is lost
        except Exception as exc:
            return job, None, _undo(conn, exc)
        conn.execute("RELEASE op")
        return job, value, None

    def _connection(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = connect(self.path, self.busy_timeout)
        return self.conn

    def _drop_connection(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        self.conn = None


def _undo(conn: sqlite3.Connection, exc: BaseException) -> BaseException:
    """This operation's own fault (bad input, a bug): undo it alone; the batch goes on."""
    conn.execute("ROLLBACK TO op")
    conn.execute("RELEASE op")
    return exc


def _resolve(results: list[tuple[Job, Any, BaseException | None]]) -> None:
    """Hand the results back to their event loops, one call per loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any, BaseException | None]]] = {}
    for item in results:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
            loop.call_soon_threadsafe(_settle, items)


def _settle(items: list[tuple[Job, Any, BaseException | None]]) -> None:
    for job, value, error in items:
        if error is None and job.on_commit is not None:
            try:
                job.on_commit(value)  # before the waiter resumes: hand-off first, then the 250
            except Exception:  # a listener's bug must not lose the caller's answer
                log.exception("spool listener failed")
        if job.future.done():
            continue  # the caller was cancelled; the operation itself is committed
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value)
