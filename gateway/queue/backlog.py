"""The spool's queries that must stay cheap with a million queued messages.

Every one is bounded by an index range and a LIMIT, never a scan of the table (the unit tests
assert it with ``EXPLAIN QUERY PLAN``):

- :func:`destinations`: the distinct destinations, one index seek each (a "loose index scan" of
  ``messages_destination``), so their number, not the messages', sets the cost;
- :func:`due_for`: one page of due messages of one destination (``messages_destination``);
- :func:`page`: one page of the listing after a queue id (the primary key), optionally of one
  destination;
- :func:`flush_destination`: a deferred destination due now.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence

from gateway.queue.model import HoldReason, QueuedMessage, Recipient, RecipientStatus
from gateway.queue.store import _MESSAGE_COLUMNS, ACTIVE, DEFERRED, HELD, _row_to_message

# One step of the loose index scan: the next destination after the given one.
_DESTINATIONS = """
WITH RECURSIVE d(name) AS (
    SELECT (SELECT MIN(destination) FROM messages WHERE destination > ?)
    UNION ALL
    SELECT (SELECT MIN(destination) FROM messages WHERE destination > d.name)
    FROM d WHERE d.name IS NOT NULL LIMIT ?
)
SELECT name FROM d WHERE name IS NOT NULL
"""


def destinations(conn: sqlite3.Connection, after: str | None, limit: int) -> list[str]:
    """Up to ``limit`` destinations in order after ``after`` (None: from the first; the empty
    destination of messages stored before the column existed comes first)."""
    names: list[str] = []
    if after is None:
        row = conn.execute("SELECT MIN(destination) FROM messages").fetchone()
        if row is None or row[0] is None:
            return []
        names.append(row[0])
        after, limit = row[0], limit - 1
    if limit > 0:
        names += [r[0] for r in conn.execute(_DESTINATIONS, (after, limit))]
    return names


# INDEXED BY: with statistics (ANALYZE) of one huge destination SQLite would rather scan the
# table for the rare active rows; the index is always right here.
_BY_DESTINATION = "messages INDEXED BY messages_destination"
DUE_SQL = (
    f"SELECT id, size, owner FROM {_BY_DESTINATION} WHERE destination = ? AND state = '{ACTIVE}'"
    " AND (owner IS NULL OR owner IN ({marks}))"
    f" UNION ALL SELECT id, size, NULL FROM {_BY_DESTINATION} WHERE destination = ?"
    f" AND state = '{DEFERRED}' AND next_attempt <= ?"
    f" UNION ALL SELECT id, size, NULL FROM {_BY_DESTINATION} WHERE destination = ?"
    f" AND state = '{HELD}' AND next_attempt <= ? AND hold_reason = ?"
    " LIMIT ?"
)


def due_for(
    conn: sqlite3.Connection,
    destination: str,
    now: float,
    limit: int,
    claimable: Sequence[str] = (),
) -> list[tuple[str, int, str | None]]:
    """(id, size, owner) of up to ``limit`` messages of ``destination`` due for an attempt by
    this process: active ones without a live owner first (a crash's leftovers), then deferred
    ones by due time, then TLS holds whose retry came.  Each branch is one range of
    ``messages_destination``.  The size lets the scheduler reserve memory before loading; the
    owner (active ones only) spares it the claim of what is already its own."""
    marks = ",".join("?" * len(claimable)) or "NULL"
    rows = conn.execute(
        DUE_SQL.format(marks=marks),
        (destination, *claimable, destination, now, destination, now, HoldReason.TLS, limit),
    ).fetchall()
    return [(row[0], int(row[1] or 0), row[2]) for row in rows]


def page(
    conn: sqlite3.Connection, after: str, limit: int, destination: str | None = None
) -> list[QueuedMessage]:
    """Up to ``limit`` messages (without data) with ids after ``after``, oldest first, with
    their recipients; of one destination when given."""
    where, args = "id > ?", [after]  # the primary key: a range, whatever the statistics
    if destination is not None:
        where += " AND destination = ?"
        args.append(destination)
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where} ORDER BY id LIMIT ?",
        (*args, limit),
    ).fetchall()
    if not rows:
        return []
    marks = ",".join("?" * len(rows))
    recipients: dict[str, list[Recipient]] = {}
    for qid, addr, pos, status, reply, mta in conn.execute(
        "SELECT message_id, address, position, status, last_reply, remote_mta FROM recipients"
        f" WHERE message_id IN ({marks}) ORDER BY message_id, position",
        [row[0] for row in rows],
    ):
        recipients.setdefault(qid, []).append(
            Recipient(addr, pos, RecipientStatus(status), reply, mta)
        )
    return [_row_to_message(row, recipients.get(row[0], []), b"") for row in rows]


def pages(
    conn: sqlite3.Connection,
    after: str = "",
    size: int = 1000,
    destination: str | None = None,
    limit: int | None = None,
) -> Iterator[QueuedMessage]:
    """Every message after ``after`` (at most ``limit``), read one page at a time: memory stays
    bounded by the page, whatever the queue holds."""
    left = limit
    while left is None or left > 0:
        batch = page(conn, after, size if left is None else min(size, left), destination)
        yield from batch
        if not batch:
            return
        after = batch[-1].id
        if left is not None:
            left -= len(batch)


def flush_destination(conn: sqlite3.Connection, destination: str, now: float) -> int:
    """Every deferred message of ``destination`` is due now (one index range)."""
    return conn.execute(
        f"UPDATE {_BY_DESTINATION} SET next_attempt = ? WHERE destination = ?"
        f" AND state = '{DEFERRED}'"
        " AND next_attempt > ?",
        (now, destination, now),
    ).rowcount
