"""The durable queue: one SQLite database in WAL mode with ``synchronous=FULL``.

Why SQLite: a commit in WAL mode with ``synchronous=FULL`` is one append to the write-ahead log
and one fsync; after it returns, a SIGKILL or a power cut loses nothing and corrupts nothing, and
another process (``smg queue``) can read and change the same database while the relay runs.

Group commit: the relay never writes from the event loop.  Every write is an *operation* (a
function of a connection) handed to one writer thread, which takes everything that is pending,
runs it in one transaction (a savepoint per operation, so one bad operation fails alone) and
commits once: one fsync covers every message that arrived meanwhile.  The caller awaits a future
that is resolved only after the commit returned, so ``enqueue`` returning means durable.

A disk that is full, a spool that is not writable, or any other SQLite I/O error raises
:class:`SpoolUnavailable` to every caller of the failed transaction: the intake answers 4xx and
the client keeps its message.

Message states: ``active`` (new, or being delivered), ``deferred`` (waiting for
``next_attempt``), ``held`` (an operator's hold, or ``hold_reason = "tls"``: retried on the TLS
hold schedule).  A message leaves the database once none of its recipients is pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("smg.spool")

DB_NAME = "queue.sqlite"
SCHEMA_VERSION = 2
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another process's lock (smg queue)
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

ROUTES = ("direct", "bad_gateway")
STATES = ("active", "deferred", "held")
KINDS = ("mail", "ndr")
HOLD_TLS = "tls"
HOLD_OPERATOR = "operator"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           TEXT PRIMARY KEY,
    sender       TEXT NOT NULL,
    data         BLOB NOT NULL,
    size         INTEGER NOT NULL,
    route        TEXT NOT NULL CHECK (route IN ('direct', 'bad_gateway')),
    state        TEXT NOT NULL CHECK (state IN ('active', 'deferred', 'held')),
    hold_reason  TEXT,
    kind         TEXT NOT NULL DEFAULT 'mail' CHECK (kind IN ('mail', 'ndr')),
    created_at   REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_attempt REAL,
    client_ip    TEXT,
    helo         TEXT,
    facts        TEXT NOT NULL DEFAULT '{}',
    owner        TEXT
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt);
CREATE INDEX IF NOT EXISTS messages_owner ON messages (state, owner);
CREATE TABLE IF NOT EXISTS recipients (
    message_id  TEXT NOT NULL,
    position    INTEGER NOT NULL,
    address     TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'delivered', 'bounced')),
    last_reply  TEXT,
    remote_mta  TEXT,
    updated_at  REAL,
    PRIMARY KEY (message_id, position)
);
"""


class SpoolUnavailable(Exception):
    """The spool cannot take or change messages now (disk full, not writable, I/O error)."""


class UnknownMessage(KeyError):
    """No message with this queue id (never was, or already delivered or deleted)."""

    def __str__(self) -> str:
        return f"no message with queue id {self.args[0]!r} in the queue"


# --- queue ids --------------------------------------------------------------------------------

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sorts like the number
_id_lock = threading.Lock()
_last_micros = 0
_process_salt = secrets.randbelow(32 * 32)


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_queue_id() -> str:
    """13 characters, sortable by creation time: 11 for the microsecond clock (strictly
    increasing within the process) and 2 for a per-process salt, so that several processes
    writing to one spool do not collide (and a collision is retried on insert anyway)."""
    global _last_micros
    with _id_lock:
        micros = max(time.time_ns() // 1000, _last_micros + 1)
        _last_micros = micros
    return _base32(micros, 11) + _base32(_process_salt, 2)


# --- owners: which relay process is delivering an active message ----------------------------
#
# An active message belongs to the process that enqueued or claimed it (``owner``).  Several
# processes (``gateway.workers``) share one spool: each delivers what it owns, and takes over
# active messages only from owners that are gone (crashed, or the relay restarted).  An owner
# names the boot, the PID and the PID's start time, so a reused PID is not mistaken for it.

_owner_cache: tuple[int, str] | None = None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_owner() -> str:
    """This process's owner name (recomputed after a fork)."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is None or _owner_cache[0] != pid:
        _owner_cache = (pid, f"{_boot_id()}:{pid}:{_start_time(pid)}")
    return _owner_cache[1]


def owner_alive(owner: str | None) -> bool:
    """Is the process named by ``owner`` still running (on this boot)?"""
    if not owner:
        return False
    boot, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if boot != _boot_id() or not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) == started


# --- records ---------------------------------------------------------------------------------


@dataclass
class Recipient:
    address: str
    position: int = 0
    status: str = "pending"  # pending | delivered | bounced
    last_reply: str | None = None
    remote_mta: str | None = None


@dataclass
class QueuedMessage:
    id: str
    sender: str
    recipients: list[Recipient]
    data: bytes
    route: str = "direct"
    state: str = "active"
    hold_reason: str | None = None
    kind: str = "mail"
    created_at: float = 0.0
    next_attempt: float = 0.0
    attempts: int = 0
    last_attempt: float | None = None
    client_ip: str | None = None
    helo: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    stored_size: int = 0  # the size column (listings load no data)

    @property
    def size_on_disk(self) -> int:
        return len(self.data) or self.stored_size

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "pending"]


@dataclass(frozen=True)
class NewMessage:
    """A message to insert (an NDR queued together with the result that caused it)."""

    sender: str
    recipients: Sequence[str]
    data: bytes
    route: str = "direct"
    state: str = "active"
    kind: str = "mail"
    hold_reason: str | None = None
    client_ip: str | None = None
    helo: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipientUpdate:
    position: int
    status: str  # delivered | bounced | pending (pending: only the reply is recorded)
    reply: str | None = None
    remote_mta: str | None = None


@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt found, written in one operation (atomic with its NDR, so a
    crash never gives two NDRs for one failure).

    ``next_state`` is what the message becomes if recipients remain pending: ``deferred`` or
    ``held`` (with ``hold_reason``).  An operator's hold or delete made during the attempt wins.
    """

    queue_id: str
    updates: Sequence[RecipientUpdate]
    next_state: str = "deferred"
    next_attempt: float = 0.0
    hold_reason: str | None = None
    ndr: NewMessage | None = None
    complete: bool = False  # every recipient is done (delivered or bounced): remove it


@dataclass(frozen=True)
class AttemptOutcome:
    """What :meth:`Spool.finish_attempt` did: ``removed`` (no recipient left), ``gone``
    (deleted by an operator meanwhile), else the state the message is now in."""

    state: str
    ndr_id: str | None = None


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # enums
        return value.value
    return str(value)


def dump_facts(facts: dict[str, Any] | None) -> str:
    return json.dumps(facts or {}, default=_jsonable, sort_keys=True)


# --- SQL operations (shared by the relay's writer thread and smg queue) ----------------------


def connect(
    path: Path, busy_timeout: float = BUSY_TIMEOUT, readonly: bool = False
) -> sqlite3.Connection:
    """A connection with the pragmas every user of the spool must share."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout,
        )
    else:
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode})")
    # FULL: the WAL is fsynced at every commit, so a commit that returned survives a power cut.
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"spool schema version {version} is newer than this relay understands"
        )
    if version == 1:  # version 2 added the owner column (several relay processes)
        conn.execute("ALTER TABLE messages ADD COLUMN owner TEXT")
    # Statement by statement: executescript() would commit the caller's transaction.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def insert_message(conn: sqlite3.Connection, msg: NewMessage, now: float) -> str:
    """Insert one message and its recipients; returns the new queue id."""
    if msg.route not in ROUTES or msg.state not in STATES or msg.kind not in KINDS:
        raise ValueError(f"invalid route/state/kind {msg.route}/{msg.state}/{msg.kind}")
    if not msg.recipients:
        raise ValueError("a message needs at least one recipient")
    facts = dump_facts(msg.facts)
    for _ in range(5):
        queue_id = new_queue_id()
        try:
            conn.execute(
                "INSERT INTO messages (id, sender, data, size, route, state, hold_reason, kind,"
                " created_at, next_attempt, client_ip, helo, facts, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    queue_id,
                    msg.sender,
                    msg.data,
                    len(msg.data),
                    msg.route,
                    msg.state,
                    msg.hold_reason,
                    msg.kind,
                    now,
                    now,
                    msg.client_ip,
                    msg.helo,
                    facts,
                    process_owner() if msg.state == "active" else None,
                ),
            )
            break
        except sqlite3.IntegrityError:
            continue  # the same id from another process in the same microsecond: try again
    else:
        raise sqlite3.IntegrityError("could not allocate a unique queue id")
    conn.executemany(
        "INSERT INTO recipients (message_id, position, address) VALUES (?, ?, ?)",
        [(queue_id, pos, addr) for pos, addr in enumerate(msg.recipients)],
    )
    return queue_id


_MESSAGE_COLUMNS = (
    "id, sender, route, state, hold_reason, kind, created_at, next_attempt, attempts,"
    " last_attempt, client_ip, helo, facts, size"
)


def _row_to_message(
    row: sqlite3.Row | tuple, recipients: list[Recipient], data: bytes
) -> QueuedMessage:
    (
        qid,
        sender,
        route,
        state,
        hold_reason,
        kind,
        created,
        next_attempt,
        attempts,
        last_attempt,
        client_ip,
        helo,
        facts,
        size,
    ) = row
    try:
        facts_dict = json.loads(facts) if facts else {}
    except ValueError:
        facts_dict = {"unparseable_facts": facts}
    return QueuedMessage(
        id=qid,
        sender=sender,
        recipients=recipients,
        data=data,
        route=route,
        state=state,
        hold_reason=hold_reason,
        kind=kind,
        created_at=created,
        next_attempt=next_attempt,
        attempts=attempts,
        last_attempt=last_attempt,
        client_ip=client_ip,
        helo=helo,
        facts=facts_dict,
        stored_size=size,
    )


def load_recipients(conn: sqlite3.Connection, queue_id: str) -> list[Recipient]:
    rows = conn.execute(
        "SELECT address, position, status, last_reply, remote_mta FROM recipients"
        " WHERE message_id = ? ORDER BY position",
        (queue_id,),
    ).fetchall()
    return [Recipient(*row) for row in rows]


def load_message(
    conn: sqlite3.Connection, queue_id: str, with_data: bool = True
) -> QueuedMessage | None:
    columns = _MESSAGE_COLUMNS + (", data" if with_data else "")
    row = conn.execute(f"SELECT {columns} FROM messages WHERE id = ?", (queue_id,)).fetchone()
    if row is None:
        return None
    data = bytes(row[-1]) if with_data else b""
    meta = row[:-1] if with_data else row
    return _row_to_message(meta, load_recipients(conn, queue_id), data)


def list_messages(conn: sqlite3.Connection) -> list[QueuedMessage]:
    """Every queued message without its data, oldest first."""
    rows = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages ORDER BY id").fetchall()
    recipients: dict[str, list[Recipient]] = {}
    for qid, addr, pos, status, reply, mta in conn.execute(
        "SELECT message_id, address, position, status, last_reply, remote_mta FROM recipients"
        " ORDER BY message_id, position"
    ):
        recipients.setdefault(qid, []).append(Recipient(addr, pos, status, reply, mta))
    return [_row_to_message(row, recipients.get(row[0], []), b"") for row in rows]


def due_ids(
    conn: sqlite3.Connection, now: float, limit: int, claimable: Sequence[str] = ()
) -> list[str]:
    """Messages whose attempt is due: deferred ones whose time has come, TLS holds whose
    hold_retry has come, and active ones without a live owner (``claimable``: the owners that
    are gone, and the caller itself).  An operator's hold is never due."""
    marks = ",".join("?" * len(claimable)) or "NULL"
    rows = conn.execute(
        "SELECT id FROM messages WHERE state = 'deferred' AND next_attempt <= ?"
        " UNION ALL SELECT id FROM messages WHERE state = 'held' AND hold_reason = ?"
        " AND next_attempt <= ?"
        " UNION ALL SELECT id FROM messages WHERE state = 'active'"
        f" AND (owner IS NULL OR owner IN ({marks}))"
        " ORDER BY 1 LIMIT ?",
        (now, HOLD_TLS, now, *claimable, limit),
    ).fetchall()
    return [row[0] for row in rows]


def active_owners(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT DISTINCT owner FROM messages WHERE state = 'active' AND owner IS NOT NULL"
    ).fetchall()
    return [row[0] for row in rows]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    result = dict.fromkeys(STATES, 0)
    for state, number in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state"):
        result[state] = number
    return result


def begin_attempt(
    conn: sqlite3.Connection, queue_id: str, now: float, claimable: Sequence[str] = ()
) -> bool:
    """Claim a due message for this process (compare-and-set, so of several processes only one
    wins); False if it is not due any more, another live process has it, or an operator held
    or deleted it meanwhile."""
    marks = ",".join("?" * len(claimable)) or "NULL"
    cur = conn.execute(
        "UPDATE messages SET state = 'active', hold_reason = NULL, owner = ? WHERE id = ? AND ("
        " (state = 'deferred' AND next_attempt <= ?)"
        " OR (state = 'held' AND hold_reason = ? AND next_attempt <= ?)"
        f" OR (state = 'active' AND (owner IS NULL OR owner IN ({marks}))))",
        (process_owner(), queue_id, now, HOLD_TLS, now, *claimable),
    )
    return cur.rowcount == 1


def finish_attempt(conn: sqlite3.Connection, result: AttemptResult, now: float) -> AttemptOutcome:
    if result.complete:  # the common case, in two statements
        if not _delete(conn, result.queue_id):
            return AttemptOutcome("gone")  # an operator deleted it during the attempt
        ndr_id = insert_message(conn, result.ndr, now) if result.ndr is not None else None
        return AttemptOutcome("removed", ndr_id)
    row = conn.execute("SELECT state FROM messages WHERE id = ?", (result.queue_id,)).fetchone()
    if row is None:
        return AttemptOutcome("gone")  # an operator deleted it during the attempt
    conn.executemany(
        "UPDATE recipients SET status = ?, last_reply = COALESCE(?, last_reply),"
        " remote_mta = COALESCE(?, remote_mta), updated_at = ?"
        " WHERE message_id = ? AND position = ? AND status = 'pending'",
        [
            (u.status, u.reply, u.remote_mta, now, result.queue_id, u.position)
            for u in result.updates
        ],
    )
    ndr_id = insert_message(conn, result.ndr, now) if result.ndr is not None else None
    pending = conn.execute(
        "SELECT COUNT(*) FROM recipients WHERE message_id = ? AND status = 'pending'",
        (result.queue_id,),
    ).fetchone()[0]
    if pending == 0:
        _delete(conn, result.queue_id)
        return AttemptOutcome("removed", ndr_id)
    if row[0] == "held":  # held by an operator during the attempt: stays held
        conn.execute(
            "UPDATE messages SET attempts = attempts + 1, last_attempt = ? WHERE id = ?",
            (now, result.queue_id),
        )
        return AttemptOutcome("held", ndr_id)
    conn.execute(
        "UPDATE messages SET state = ?, hold_reason = ?, next_attempt = ?,"
        " attempts = attempts + 1, last_attempt = ? WHERE id = ?",
        (result.next_state, result.hold_reason, result.next_attempt, now, result.queue_id),
    )
    return AttemptOutcome(result.next_state, ndr_id)


def _delete(conn: sqlite3.Connection, queue_id: str) -> int:
    conn.execute("DELETE FROM recipients WHERE message_id = ?", (queue_id,))
    return conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,)).rowcount


# Operator actions.  Each returns the number of messages it changed.


def hold(conn: sqlite3.Connection, queue_id: str) -> int:
    return conn.execute(
        "UPDATE messages SET state = 'held', hold_reason = ? WHERE id = ?",
        (HOLD_OPERATOR, queue_id),
    ).rowcount


def release(conn: sqlite3.Connection, queue_id: str, now: float) -> int:
    """A held message becomes due now (its lifetime still counts from its arrival)."""
    return conn.execute(
        "UPDATE messages SET state = 'deferred', hold_reason = NULL, next_attempt = ?"
        " WHERE id = ? AND state = 'held'",
        (now, queue_id),
    ).rowcount


def delete(conn: sqlite3.Connection, queue_id: str) -> int:
    return _delete(conn, queue_id)


def flush(conn: sqlite3.Connection, now: float) -> int:
    """Every deferred message is due now (held ones stay held, like postqueue -f)."""
    return conn.execute(
        "UPDATE messages SET next_attempt = ? WHERE state = 'deferred' AND next_attempt > ?",
        (now, now),
    ).rowcount


def exists(conn: sqlite3.Connection, queue_id: str) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE id = ?", (queue_id,)).fetchone() is not None


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``gateway.spool`` is a directory; the database is ``queue.sqlite`` inside it.  A path
    ending in ``.sqlite`` or ``.db`` is taken as the database itself (tests)."""
    p = Path(path)
    if p.suffix in (".sqlite", ".db"):
        return p
    return p / DB_NAME


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
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


# --- the writer thread ------------------------------------------------------------------------

Operation = Callable[[sqlite3.Connection], Any]
_STOP = object()


@dataclass
class _Job:
    op: Operation
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    on_commit: Callable[[Any], None] | None = None


class _Writer(threading.Thread):
    """Runs operations in batches: one transaction, one commit (one fsync) per batch."""

    def __init__(self, path: Path, busy_timeout: float) -> None:
        super().__init__(name="smg-spool-writer", daemon=True)
        self.path = path
        self.busy_timeout = busy_timeout
        self.jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
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
            if job is _STOP:
                break
            batch: list[_Job] = [job]  # type: ignore[list-item]
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

    def _gather(self, batch: list[_Job]) -> bool:
        """Wait (up to commit_delay) until COMMIT_TARGET operations are there; True on _STOP."""
        deadline = time.monotonic() + self.commit_delay
        while len(batch) < COMMIT_TARGET:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                more = self.jobs.get(timeout=remaining)
            except queue.Empty:
                return False
            if more is _STOP:
                return True
            batch.append(more)  # type: ignore[arg-type]
        return False

    def _drain(self, batch: list[_Job]) -> bool:
        """Add what is pending to ``batch`` (up to MAX_BATCH); True on _STOP."""
        while len(batch) < MAX_BATCH:
            try:
                more = self.jobs.get_nowait()
            except queue.Empty:
                break
            if more is _STOP:
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

    def _run_batch(self, batch: list[_Job]) -> None:
        results: list[tuple[_Job, Any, BaseException | None]] = []
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
            error = SpoolUnavailable(f"spool {self.path}: {exc}")
            results = [(job, None, error) for job in batch]
        _resolve(results)

    @staticmethod
    def _run_one(conn: sqlite3.Connection, job: _Job) -> tuple[_Job, Any, BaseException | None]:
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


def _resolve(results: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """Hand the results back to their event loops, one call per loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]] = {}
    for item in results:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
            loop.call_soon_threadsafe(_settle, items)


def _settle(items: list[tuple[_Job, Any, BaseException | None]]) -> None:
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


# --- the relay's handle ----------------------------------------------------------------------


class Spool:
    """The relay's asynchronous handle on the spool database (see the module docstring)."""

    def __init__(self, path: Path, writer: _Writer, reader: sqlite3.Connection) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._read_executor = concurrent.futures.ThreadPoolExecutor(1, "smg-spool-reader")
        self._listeners: list[Callable[[QueuedMessage], None]] = []
        self._claimable: set[str] = {process_owner()}  # owners whose active mail we may take
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], busy_timeout: float = BUSY_TIMEOUT) -> Spool:
        """Open (and create) the spool database under ``path`` (``gateway.spool``)."""
        db_path = resolve_path(path)
        return await asyncio.to_thread(cls._open_sync, db_path, busy_timeout)

    @classmethod
    def _open_sync(cls, db_path: Path, busy_timeout: float) -> Spool:
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Several workers start at once: switching a new database to WAL takes a lock that
            # SQLite does not wait for, so they take turns on the lock file here.
            with _file_lock(db_path.with_suffix(".lock")):
                conn = connect(db_path, busy_timeout)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    create_schema(conn)
                    conn.execute("COMMIT")
                finally:
                    conn.close()
                reader = connect(db_path, busy_timeout)
        except (sqlite3.Error, OSError) as exc:
            raise SpoolUnavailable(f"cannot open spool {db_path}: {exc}") from exc
        writer = _Writer(db_path, busy_timeout)
        writer.start()
        return cls(db_path, writer, reader)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.jobs.put(_STOP)
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
        self._writer.jobs.put(_Job(op, future, loop, on_commit))
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
        route: str = "direct",
        state: str = "active",
        client_ip: str | None = None,
        helo: str | None = None,
        facts: dict[str, Any] | None = None,
        kind: str = "mail",
        hold_reason: str | None = None,
    ) -> str:
        """Store one message durably and return its queue id (raises SpoolUnavailable)."""
        if state == "held" and hold_reason is None:
            hold_reason = "policy"
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
            dict(facts or {}),
        )
        now = time.time()

        def notify(queue_id: str) -> None:
            if state != "active" or not self._listeners:
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
            )
            for callback in self._listeners:
                callback(message)

        return await self.submit(lambda conn: insert_message(conn, new, now), notify)

    async def begin_attempt(self, queue_id: str) -> bool:
        """Claim a message found by :meth:`due` (see :func:`begin_attempt`)."""
        now = time.time()
        claimable = tuple(self._claimable)
        return await self.submit(lambda conn: begin_attempt(conn, queue_id, now, claimable))

    async def finish_attempt(self, result: AttemptResult) -> AttemptOutcome:
        now = time.time()
        ndr = result.ndr

        def op(conn: sqlite3.Connection) -> AttemptOutcome:
            return finish_attempt(conn, result, now)

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
        return bool(await self.submit(lambda conn: hold(conn, queue_id)))

    async def release(self, queue_id: str) -> bool:
        now = time.time()
        return bool(await self.submit(lambda conn: release(conn, queue_id, now)))

    async def delete(self, queue_id: str) -> bool:
        return bool(await self.submit(lambda conn: delete(conn, queue_id)))

    async def flush(self) -> int:
        now = time.time()
        return int(await self.submit(lambda conn: flush(conn, now)))

    # -- reading ------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()

        def run() -> Any:
            try:
                return fn(self._reader)
            except sqlite3.Error as exc:
                raise SpoolUnavailable(f"spool {self.path}: {exc}") from exc

        return await loop.run_in_executor(self._read_executor, run)

    async def load(self, queue_id: str, with_data: bool = True) -> QueuedMessage | None:
        return await self._read(lambda conn: load_message(conn, queue_id, with_data))

    async def due(self, limit: int, now: float | None = None) -> list[str]:
        """Ids of messages due for an attempt by this process (see :func:`due_ids`)."""
        when = time.time() if now is None else now

        def query(conn: sqlite3.Connection) -> list[str]:
            me = process_owner()
            gone = {o for o in active_owners(conn) if o != me and not owner_alive(o)}
            self._claimable = {me, *gone}
            return due_ids(conn, when, limit, tuple(self._claimable))

        return await self._read(query)

    async def state_of(self, queue_id: str) -> str | None:
        def query(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT state FROM messages WHERE id = ?", (queue_id,)).fetchone()
            return row[0] if row else None

        return await self._read(query)

    async def list(self) -> list[QueuedMessage]:
        return await self._read(list_messages)

    async def counts(self) -> dict[str, int]:
        return await self._read(counts)

    @property
    def stats(self) -> dict[str, int]:
        """Commits and operations so far (how well group commit groups)."""
        return {"commits": self._writer.commits, "operations": self._writer.operations}


# --- synchronous access for smg queue --------------------------------------------------------


class SpoolAdmin:
    """The operator's handle (``smg queue``): plain synchronous SQLite on the same database,
    safe while the relay runs (WAL readers never block it; writes wait at most busy_timeout)."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = resolve_path(path)
        if not self.path.exists():
            raise SpoolUnavailable(f"no spool database at {self.path}")
        try:
            self.conn = connect(self.path, busy_timeout)
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"cannot open spool {self.path}: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SpoolAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                changed = fn(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"spool {self.path}: {exc}") from exc
        return changed

    def _require(self, queue_id: str) -> None:
        if not exists(self.conn, queue_id):
            raise UnknownMessage(queue_id)

    def list(self) -> list[QueuedMessage]:
        return list_messages(self.conn)

    def show(self, queue_id: str) -> QueuedMessage:
        message = load_message(self.conn, queue_id)
        if message is None:
            raise UnknownMessage(queue_id)
        return message

    def hold(self, queue_id: str) -> int:
        self._require(queue_id)
        return self._write(lambda conn: hold(conn, queue_id))

    def release(self, queue_id: str) -> int:
        self._require(queue_id)
        return self._write(lambda conn: release(conn, queue_id, time.time()))

    def delete(self, queue_id: str) -> int:
        self._require(queue_id)
        return self._write(lambda conn: delete(conn, queue_id))

    def flush(self) -> int:
        return self._write(lambda conn: flush(conn, time.time()))

    def counts(self) -> dict[str, int]:
        return counts(self.conn)


def ids_of(messages: Iterable[QueuedMessage]) -> list[str]:
    return [m.id for m in messages]
