"""The spool's SQL: schema, connections and every operation, each a function of a connection
(shared by the relay's writer thread and ``smg queue``).

One SQLite database in WAL mode with ``synchronous=FULL``: a commit is one append to the
write-ahead log and one fsync; after it returns, a SIGKILL or a power cut loses nothing and
corrupts nothing, and another process (``smg queue``) can read and change the same database
while the relay runs.  A message leaves the database once none of its recipients is pending.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from gateway.queue.model import (
    AttemptEnd,
    AttemptOutcome,
    AttemptResult,
    HoldReason,
    MessageKind,
    MessageState,
    NewMessage,
    QueuedMessage,
    Recipient,
    RecipientStatus,
    Route,
)
from gateway.queue.owners import new_queue_id, process_owner

DB_NAME = "queue.sqlite"
SCHEMA_VERSION = 4
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another process's lock (smg queue)

# For the SQL text below: the stored values.
ACTIVE, DEFERRED, HELD = MessageState
PENDING = RecipientStatus.PENDING
MAIL = MessageKind.MAIL


def _sql_list(values: type[StrEnum]) -> str:
    """The values as an SQL list: ``'active', 'deferred', 'held'``."""
    return ", ".join(f"'{value}'" for value in values)


# The CHECK lists come from the enums, so the text (and the schema on disk) is what it was.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    id           TEXT PRIMARY KEY,
    sender       TEXT NOT NULL,
    data         BLOB NOT NULL,
    size         INTEGER NOT NULL,
    route        TEXT NOT NULL CHECK (route IN ({_sql_list(Route)})),
    state        TEXT NOT NULL CHECK (state IN ({_sql_list(MessageState)})),
    hold_reason  TEXT,
    kind         TEXT NOT NULL DEFAULT '{MAIL}' CHECK (kind IN ({_sql_list(MessageKind)})),
    created_at   REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_attempt REAL,
    client_ip    TEXT,
    helo         TEXT,
    facts        TEXT NOT NULL DEFAULT '{{}}',
    owner        TEXT,
    destination  TEXT NOT NULL DEFAULT '',
    tenant       TEXT
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt);
CREATE INDEX IF NOT EXISTS messages_owner ON messages (state, owner);
CREATE INDEX IF NOT EXISTS messages_destination ON messages (destination, state, next_attempt);
CREATE TABLE IF NOT EXISTS recipients (
    message_id  TEXT NOT NULL,
    position    INTEGER NOT NULL,
    address     TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT '{PENDING}'
                CHECK (status IN ({_sql_list(RecipientStatus)})),
    last_reply  TEXT,
    remote_mta  TEXT,
    updated_at  REAL,
    PRIMARY KEY (message_id, position)
);
"""


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


def quick_check(conn: sqlite3.Connection) -> str | None:
    """What SQLite's ``PRAGMA quick_check`` says is wrong with the database, None when it is
    sound.  quick_check reads every page and checks the b-trees but not that each index
    matches its table: O(pages), 0.5 s on a spool of 100k 2 KB messages (222 MB, measured;
    docs/queue.md).  A database too damaged to run the check at all raises
    :class:`sqlite3.DatabaseError`, which is an answer too (the caller reports it the same way)."""
    rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check(20)").fetchall()]
    return None if rows == ["ok"] else "; ".join(rows)


def create_schema(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"spool schema version {version} is newer than this relay understands"
        )
    _migrate(conn, version)
    # Statement by statement: executescript() would commit the caller's transaction.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def destination_of(address: str) -> str:
    """A recipient's destination: its domain in lower case (what shaping and ``smg queue
    --destination`` go by)."""
    return address.rpartition("@")[2].lower()


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Chained steps from ``version`` (0: a new database, nothing to do) to SCHEMA_VERSION."""
    if version == 0:
        return
    if version < 2:  # version 2 added the owner column (several relay processes)
        conn.execute("ALTER TABLE messages ADD COLUMN owner TEXT")
    if version < 3:  # version 3: the destination column (per-destination scans and shaping)
        conn.execute("ALTER TABLE messages ADD COLUMN destination TEXT NOT NULL DEFAULT ''")
        conn.create_function("smg_destination", 1, destination_of, deterministic=True)
        conn.execute(
            "UPDATE messages SET destination = COALESCE((SELECT smg_destination(address)"
            " FROM recipients WHERE message_id = messages.id ORDER BY position LIMIT 1), '')"
        )
    if version < 4:  # version 4: the tenant column (the customer that sent it; issue 11)
        conn.execute("ALTER TABLE messages ADD COLUMN tenant TEXT")


def insert_message(conn: sqlite3.Connection, msg: NewMessage, now: float) -> str:
    """Insert one message and its recipients; returns the new queue id."""
    if not (_valid(Route, msg.route) and _valid(MessageState, msg.state)
            and _valid(MessageKind, msg.kind)):  # fmt: skip
        raise ValueError(f"invalid route/state/kind {msg.route}/{msg.state}/{msg.kind}")
    if not msg.recipients:
        raise ValueError("a message needs at least one recipient")
    facts = dump_facts(msg.facts)
    for _ in range(5):
        queue_id = new_queue_id()
        try:
            conn.execute(
                "INSERT INTO messages (id, sender, data, size, route, state, hold_reason, kind,"
                " created_at, next_attempt, client_ip, helo, facts, owner, destination, tenant)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    process_owner() if msg.state == MessageState.ACTIVE else None,
                    destination_of(msg.recipients[0]),
                    msg.tenant,
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
    " last_attempt, client_ip, helo, facts, size, tenant"
)


def _valid(kind: type[StrEnum], value: str) -> bool:
    return value in kind.__members__.values()


def _hold_reason(text: str | None) -> HoldReason | None:
    """The stored hold reason (a free text column: one this relay does not know reads as the
    operator's, which is never due by itself)."""
    if text is None:
        return None
    return HoldReason(text) if _valid(HoldReason, text) else HoldReason.OPERATOR


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
        tenant,
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
        route=Route(route),
        state=MessageState(state),
        hold_reason=_hold_reason(hold_reason),
        kind=MessageKind(kind),
        created_at=created,
        next_attempt=next_attempt,
        attempts=attempts,
        last_attempt=last_attempt,
        client_ip=client_ip,
        helo=helo,
        facts=facts_dict,
        stored_size=size,
        tenant=tenant,
    )


def load_recipients(conn: sqlite3.Connection, queue_id: str) -> list[Recipient]:
    rows = conn.execute(
        "SELECT address, position, status, last_reply, remote_mta FROM recipients"
        " WHERE message_id = ? ORDER BY position",
        (queue_id,),
    ).fetchall()
    return [Recipient(a, p, RecipientStatus(s), r, m) for a, p, s, r, m in rows]


def load_message(
    conn: sqlite3.Connection, queue_id: str, with_data: bool = True, owned_by: str | None = None
) -> QueuedMessage | None:
    """The message, or None if it is gone (or, with ``owned_by``, not active for that owner)."""
    columns = _MESSAGE_COLUMNS + (", data" if with_data else "")
    where, args = "id = ?", [queue_id]
    if owned_by is not None:
        where += f" AND state = '{ACTIVE}' AND owner = ?"
        args.append(owned_by)
    row = conn.execute(f"SELECT {columns} FROM messages WHERE {where}", args).fetchone()
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
        recipients.setdefault(qid, []).append(
            Recipient(addr, pos, RecipientStatus(status), reply, mta)
        )
    return [_row_to_message(row, recipients.get(row[0], []), b"") for row in rows]


def due_ids(
    conn: sqlite3.Connection, now: float, limit: int, claimable: Sequence[str] = ()
) -> list[str]:
    """Messages whose attempt is due: deferred ones whose time has come, TLS holds whose
    hold_retry has come, and active ones without a live owner (``claimable``: the owners that
    are gone, and the caller itself).  An operator's hold is never due."""
    marks = ",".join("?" * len(claimable)) or "NULL"
    rows = conn.execute(
        f"SELECT id FROM messages WHERE state = '{DEFERRED}' AND next_attempt <= ?"
        f" UNION ALL SELECT id FROM messages WHERE state = '{HELD}' AND hold_reason = ?"
        " AND next_attempt <= ?"
        f" UNION ALL SELECT id FROM messages WHERE state = '{ACTIVE}'"
        f" AND (owner IS NULL OR owner IN ({marks}))"
        " ORDER BY 1 LIMIT ?",
        (now, HoldReason.TLS, now, *claimable, limit),
    ).fetchall()
    return [row[0] for row in rows]


def active_owners(conn: sqlite3.Connection) -> list[str]:
    """The owners of active mail: one seek of ``messages_owner`` per owner (a loose index
    scan), not a walk over every active message (mail waiting for a paused destination)."""
    rows = conn.execute(
        "WITH RECURSIVE o(name) AS ("
        f" SELECT (SELECT MIN(owner) FROM messages WHERE state = '{ACTIVE}' AND owner > '')"
        f" UNION ALL SELECT (SELECT MIN(owner) FROM messages WHERE state = '{ACTIVE}'"
        " AND owner > o.name) FROM o WHERE o.name IS NOT NULL LIMIT 1000)"
        " SELECT name FROM o WHERE name IS NOT NULL"
    ).fetchall()
    return [row[0] for row in rows]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    result = {state.value: 0 for state in MessageState}
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
        f"UPDATE messages SET state = '{ACTIVE}', hold_reason = NULL, owner = ? WHERE id = ? AND ("
        f" (state = '{DEFERRED}' AND next_attempt <= ?)"
        f" OR (state = '{HELD}' AND hold_reason = ? AND next_attempt <= ?)"
        f" OR (state = '{ACTIVE}' AND (owner IS NULL OR owner IN ({marks}))))",
        (process_owner(), queue_id, now, HoldReason.TLS, now, *claimable),
    )
    return cur.rowcount == 1


def finish_attempt(conn: sqlite3.Connection, result: AttemptResult, now: float) -> AttemptOutcome:
    if result.complete:  # the common case, in two statements
        if not _delete(conn, result.queue_id):
            return AttemptOutcome(AttemptEnd.GONE)  # an operator deleted it during the attempt
        ndr_id = insert_message(conn, result.ndr, now) if result.ndr is not None else None
        return AttemptOutcome(AttemptEnd.REMOVED, ndr_id)
    row = conn.execute("SELECT state FROM messages WHERE id = ?", (result.queue_id,)).fetchone()
    if row is None:
        return AttemptOutcome(AttemptEnd.GONE)  # an operator deleted it during the attempt
    conn.executemany(
        "UPDATE recipients SET status = ?, last_reply = COALESCE(?, last_reply),"
        " remote_mta = COALESCE(?, remote_mta), updated_at = ?"
        f" WHERE message_id = ? AND position = ? AND status = '{PENDING}'",
        [
            (u.status, u.reply, u.remote_mta, now, result.queue_id, u.position)
            for u in result.updates
        ],
    )
    ndr_id = insert_message(conn, result.ndr, now) if result.ndr is not None else None
    pending = conn.execute(
        f"SELECT COUNT(*) FROM recipients WHERE message_id = ? AND status = '{PENDING}'",
        (result.queue_id,),
    ).fetchone()[0]
    if pending == 0:
        _delete(conn, result.queue_id)
        return AttemptOutcome(AttemptEnd.REMOVED, ndr_id)
    if row[0] == MessageState.HELD:  # held by an operator during the attempt: stays held
        conn.execute(
            "UPDATE messages SET attempts = attempts + 1, last_attempt = ? WHERE id = ?",
            (now, result.queue_id),
        )
        return AttemptOutcome(AttemptEnd.HELD, ndr_id)
    conn.execute(
        "UPDATE messages SET state = ?, hold_reason = ?, next_attempt = ?,"
        " attempts = attempts + 1, last_attempt = ? WHERE id = ?",
        (result.next_state, result.hold_reason, result.next_attempt, now, result.queue_id),
    )
    return AttemptOutcome(AttemptEnd(result.next_state), ndr_id)


def _delete(conn: sqlite3.Connection, queue_id: str) -> int:
    conn.execute("DELETE FROM recipients WHERE message_id = ?", (queue_id,))
    return conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,)).rowcount


# Operator actions.  Each returns the number of messages it changed.


def hold(conn: sqlite3.Connection, queue_id: str) -> int:
    return conn.execute(
        f"UPDATE messages SET state = '{HELD}', hold_reason = ? WHERE id = ?",
        (HoldReason.OPERATOR, queue_id),
    ).rowcount


def release(conn: sqlite3.Connection, queue_id: str, now: float) -> int:
    """A held message becomes due now (its lifetime still counts from its arrival)."""
    return conn.execute(
        f"UPDATE messages SET state = '{DEFERRED}', hold_reason = NULL, next_attempt = ?"
        f" WHERE id = ? AND state = '{HELD}'",
        (now, queue_id),
    ).rowcount


def delete(conn: sqlite3.Connection, queue_id: str) -> int:
    return _delete(conn, queue_id)


def flush(conn: sqlite3.Connection, now: float) -> int:
    """Every deferred message is due now (held ones stay held, like postqueue -f)."""
    return conn.execute(
        f"UPDATE messages SET next_attempt = ? WHERE state = '{DEFERRED}' AND next_attempt > ?",
        (now, now),
    ).rowcount


def exists(conn: sqlite3.Connection, queue_id: str) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE id = ?", (queue_id,)).fetchone() is not None
