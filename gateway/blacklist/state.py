"""The blacklist monitor's memory: one SQLite database (``blacklist.state``).

Tables: ``checks`` (every run), ``results`` (every address x zone answer of a run),
``listings`` (opened when first seen listed, closed when first seen clean), ``requests``
(one removal request per listing: procedure, ticket id, when opened/closed) and ``outbox``
(every mail and ticket call owed, with attempts and the last error, so a failure is retried at
the next check and never loses the listing).

Concurrent runs: a whole check holds an exclusive ``flock`` on ``<state>.lock`` (a second run
waits, bounded, then gives up as *unknown*); every write is one ``BEGIN IMMEDIATE``
transaction; a partial unique index allows one open listing per (address, zone) whatever
happens.  ``smg blacklist status`` only reads (WAL mode lets it read during a check).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.blacklist.answers import CLEAN, LISTED
from gateway.blacklist.lookup import Result
from gateway.blacklist.zones import ZoneSpec

SCHEMA_VERSION = 1
LOCK_WAIT = 120.0  # seconds a second run waits for the first to finish

# Outbox kinds, in the order they are sent within one check: the ticket first, so that the
# mail to operations can name it; the provider's removal mail before the notice that says so.
TICKET_OPEN = "ticket_open"
REMOVAL_MAIL = "removal_mail"
LISTED_NOTICE = "listed_notice"
DELISTED_NOTICE = "delisted_notice"
TICKET_CLOSE = "ticket_close"
SEND_ORDER = (TICKET_OPEN, REMOVAL_MAIL, LISTED_NOTICE, DELISTED_NOTICE, TICKET_CLOSE)

PENDING, SENT, FAILED, CANCELLED = "pending", "sent", "failed", "cancelled"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checks (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    exit_code INTEGER,
    listed INTEGER, unknown INTEGER, clean INTEGER
);
CREATE TABLE IF NOT EXISTS results (
    check_id INTEGER NOT NULL REFERENCES checks(id),
    ip TEXT NOT NULL, zone TEXT NOT NULL, status TEXT NOT NULL,
    codes TEXT NOT NULL, meaning TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_check ON results(check_id);
CREATE TABLE IF NOT EXISTS listings (
    id INTEGER PRIMARY KEY,
    ip TEXT NOT NULL, zone TEXT NOT NULL, list_name TEXT NOT NULL, major INTEGER NOT NULL,
    codes TEXT NOT NULL, meaning TEXT NOT NULL, reason TEXT NOT NULL,
    opened_at TEXT NOT NULL, last_seen_at TEXT NOT NULL, closed_at TEXT,
    opened_check INTEGER NOT NULL REFERENCES checks(id), closed_check INTEGER REFERENCES checks(id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_listing ON listings(ip, zone) WHERE closed_at IS NULL;
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    listing_id INTEGER NOT NULL UNIQUE REFERENCES listings(id),
    opened_at TEXT NOT NULL, closed_at TEXT,
    procedure TEXT NOT NULL, procedure_text TEXT NOT NULL,
    removal_url TEXT NOT NULL, removal_mail TEXT NOT NULL,
    ticket_id TEXT, ticket_opened_at TEXT, ticket_closed_at TEXT, removal_mail_sent_at TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    listing_id INTEGER NOT NULL REFERENCES listings(id),
    kind TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_attempt_at TEXT, last_error TEXT, done_at TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(state) WHERE state = 'pending';
"""


class StateError(Exception):
    """The state database cannot be used (unwritable, locked by another run too long)."""


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass
class Changes:
    """What one check changed: listing ids opened and closed."""

    opened: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Channels:
    """Which notifications are configured: decides which outbox items a change creates."""

    mailbox: bool
    ticket: bool


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state database {self.path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path} has schema {version}, newer than this smg knows")
        if version < SCHEMA_VERSION:
            with self.transaction() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # --- concurrency ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait: float = LOCK_WAIT) -> Iterator[None]:
        """Hold the check lock: one check at a time per state database."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StateError(
                            f"another check holds {lock_path} for more than {wait:.0f}s"
                        ) from None
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- a check ----------------------------------------------------------------------------

    def start_check(self, now: datetime) -> int:
        with self.transaction() as db:
            return int(
                db.execute("INSERT INTO checks(started_at) VALUES (?)", (iso(now),)).lastrowid
            )

    def finish_check(
        self, check_id: int, now: datetime, exit_code: int, counts: dict[str, int]
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE checks SET finished_at=?, exit_code=?, listed=?, unknown=?, clean=? "
                "WHERE id=?",
                (
                    iso(now),
                    exit_code,
                    counts["listed"],
                    counts["unknown"],
                    counts["clean"],
                    check_id,
                ),
            )

    def apply_results(
        self,
        check_id: int,
        results: list[Result],
        specs: dict[str, ZoneSpec],
        now: datetime,
        channels: Channels,
    ) -> Changes:
        """Record the results and open/close listings, requests and outbox items, atomically."""
        changes = Changes()
        stamp = iso(now)
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO results VALUES (?,?,?,?,?,?,?)",
                [
                    (check_id, r.ip, r.zone, r.status, " ".join(r.codes), r.meaning, r.reason)
                    for r in results
                ],
            )
            for result in results:
                row = db.execute(
                    "SELECT id FROM listings WHERE ip=? AND zone=? AND closed_at IS NULL",
                    (result.ip, result.zone),
                ).fetchone()
                if result.status == LISTED and row is not None:
                    db.execute(
                        "UPDATE listings SET last_seen_at=?, codes=?, meaning=?, reason=? "
                        "WHERE id=?",
                        (stamp, " ".join(result.codes), result.meaning, result.reason, row["id"]),
                    )
                elif result.status == LISTED:
                    spec = specs[result.zone]
                    changes.opened.append(self._open(db, check_id, result, spec, stamp, channels))
                elif result.status == CLEAN and row is not None:
                    self._close(db, check_id, row["id"], stamp, channels)
                    changes.closed.append(row["id"])
                # UNKNOWN changes nothing: an open listing stays open, none is opened.
        return changes

    def _open(
        self,
        db: sqlite3.Connection,
        check_id: int,
        result: Result,
        spec: ZoneSpec,
        stamp: str,
        channels: Channels,
    ) -> int:
        listing_id = int(
            db.execute(
                "INSERT INTO listings(ip, zone, list_name, major, codes, meaning, reason, "
                "opened_at, last_seen_at, opened_check) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    result.ip,
                    result.zone,
                    result.list_name,
                    int(result.major),
                    " ".join(result.codes),
                    result.meaning,
                    result.reason,
                    stamp,
                    stamp,
                    check_id,
                ),
            ).lastrowid
        )
        db.execute(
            "INSERT INTO requests(listing_id, opened_at, procedure, procedure_text, removal_url, "
            "removal_mail) VALUES (?,?,?,?,?,?)",
            (
                listing_id,
                stamp,
                spec.procedure,
                spec.procedure_text,
                spec.removal_url,
                spec.removal_mail or "",
            ),
        )
        kinds = []
        if channels.ticket:
            kinds.append(TICKET_OPEN)
        if spec.removal_mail:
            kinds.append(REMOVAL_MAIL)
        if channels.mailbox:
            kinds.append(LISTED_NOTICE)
        self._queue(db, listing_id, kinds, stamp)
        return listing_id

    def _close(
        self, db: sqlite3.Connection, check_id: int, listing_id: int, stamp: str, channels: Channels
    ) -> None:
        db.execute(
            "UPDATE listings SET closed_at=?, closed_check=? WHERE id=?",
            (stamp, check_id, listing_id),
        )
        db.execute("UPDATE requests SET closed_at=? WHERE listing_id=?", (stamp, listing_id))
        # Not sent yet and no longer needed: the listing is gone.
        db.execute(
            "UPDATE outbox SET state=?, done_at=?, last_error=COALESCE(last_error, '') || ? "
            "WHERE listing_id=? AND state=? AND kind IN (?, ?)",
            (
                CANCELLED,
                stamp,
                " (cancelled: delisted)",
                listing_id,
                PENDING,
                TICKET_OPEN,
                REMOVAL_MAIL,
            ),
        )
        has_ticket = db.execute(
            "SELECT ticket_id FROM requests WHERE listing_id=?", (listing_id,)
        ).fetchone()["ticket_id"]
        kinds = []
        if channels.mailbox:
            kinds.append(DELISTED_NOTICE)
        if channels.ticket and has_ticket:
            kinds.append(TICKET_CLOSE)
        self._queue(db, listing_id, kinds, stamp)

    @staticmethod
    def _queue(db: sqlite3.Connection, listing_id: int, kinds: list[str], stamp: str) -> None:
        db.executemany(
            "INSERT INTO outbox(listing_id, kind, state, created_at) VALUES (?,?,?,?)",
            [(listing_id, kind, PENDING, stamp) for kind in kinds],
        )

    # --- the outbox -------------------------------------------------------------------------

    def pending(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM outbox WHERE state=?", (PENDING,)).fetchall()
        return sorted((dict(r) for r in rows), key=lambda r: (SEND_ORDER.index(r["kind"]), r["id"]))

    def sent(self, item: dict[str, Any], now: datetime, ticket_id: str | None = None) -> None:
        stamp = iso(now)
        with self.transaction() as db:
            db.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, last_attempt_at=?, done_at=? "
                "WHERE id=?",
                (SENT, stamp, stamp, item["id"]),
            )
            column = {
                TICKET_OPEN: "ticket_opened_at",
                TICKET_CLOSE: "ticket_closed_at",
                REMOVAL_MAIL: "removal_mail_sent_at",
            }.get(item["kind"])
            if column:
                db.execute(
                    f"UPDATE requests SET {column}=? WHERE listing_id=?",
                    (stamp, item["listing_id"]),
                )
            if ticket_id is not None:
                db.execute(
                    "UPDATE requests SET ticket_id=? WHERE listing_id=?",
                    (ticket_id, item["listing_id"]),
                )

    def failed(self, item: dict[str, Any], now: datetime, error: str, max_attempts: int) -> str:
        """Count a failed attempt; the item gives up (FAILED) after ``max_attempts``."""
        attempts = item["attempts"] + 1
        state = FAILED if attempts >= max_attempts else PENDING
        with self.transaction() as db:
            db.execute(
                "UPDATE outbox SET state=?, attempts=?, last_attempt_at=?, last_error=?, "
                "done_at=CASE WHEN ?=? THEN ? END WHERE id=?",
                (state, attempts, iso(now), error[:500], state, FAILED, iso(now), item["id"]),
            )
        return state

    # --- reading ----------------------------------------------------------------------------

    def listing(self, listing_id: int) -> dict[str, Any]:
        """A listing with its request (``request_*`` keys) and outbox items (``outbox``)."""
        row = self.db.execute(
            "SELECT l.*, r.id AS request_id, r.opened_at AS request_opened_at, "
            "r.closed_at AS request_closed_at, r.procedure, r.procedure_text, r.removal_url, "
            "r.removal_mail, r.ticket_id, r.ticket_opened_at, r.ticket_closed_at, "
            "r.removal_mail_sent_at FROM listings l JOIN requests r ON r.listing_id = l.id "
            "WHERE l.id=?",
            (listing_id,),
        ).fetchone()
        if row is None:
            raise KeyError(listing_id)
        listing = dict(row)
        listing["outbox"] = [
            dict(r)
            for r in self.db.execute(
                "SELECT * FROM outbox WHERE listing_id=? ORDER BY id", (listing_id,)
            ).fetchall()
        ]
        return listing

    def listings(
        self, *, open_only: bool = False, closed_limit: int | None = None
    ) -> list[dict[str, Any]]:
        if open_only:
            query = "SELECT id FROM listings WHERE closed_at IS NULL ORDER BY opened_at, id"
            params: tuple[Any, ...] = ()
        else:
            query = (
                "SELECT id FROM listings WHERE closed_at IS NOT NULL "
                "ORDER BY closed_at DESC, id DESC LIMIT ?"
            )
            params = (closed_limit if closed_limit is not None else -1,)
        return [self.listing(row["id"]) for row in self.db.execute(query, params).fetchall()]

    def checks(self, limit: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM checks ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def results(self, check_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM results WHERE check_id=? ORDER BY ip, zone", (check_id,)
        ).fetchall()
        return [dict(r) for r in rows]

    def undelivered(self) -> list[dict[str, Any]]:
        """Outbox items still pending or given up, with their listing's address and zone."""
        rows = self.db.execute(
            "SELECT o.*, l.ip, l.zone FROM outbox o JOIN listings l ON l.id = o.listing_id "
            "WHERE o.state IN (?, ?) ORDER BY o.id",
            (PENDING, FAILED),
        ).fetchall()
        return [dict(r) for r in rows]


def status_snapshot(store: Store, history: int, checks: int) -> dict[str, Any]:
    """Everything ``smg blacklist status`` shows."""
    return {
        "state": str(store.path),
        "open_listings": store.listings(open_only=True),
        "undelivered": store.undelivered(),
        "history": store.listings(closed_limit=history),
        "checks": store.checks(checks),
    }
