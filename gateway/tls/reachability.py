"""What the relay knows about reaching a destination with the TLS a rule needs, shared by workers.

The intake's ``tls_reachability`` rule (RCPT stage, ``on_failure = "reject"`` rules only) asks
:meth:`ReachabilityCache.answer` first; delivery writes what it learnt (a TLS delivery at a
level, or no TLS at it), and a live probe writes its answer.  A probe holds a **lease** on
(destination, level), so a flood of RCPTs to one slow destination, in any worker, runs one probe
and the others wait for its answer.  Each sender domain has a budget of probes per minute.

Multi-tenant (docs/tls.md): the key is (recipient domain, level) only: an answer is a property
of the destination, measured by us, never data a customer writes.  A customer can provoke a
probe (within its budget, to public MX addresses on the delivery port only), but not choose its
answer; the one thing a flood could provoke (a timeout at an overloaded far end) is a
*temporary* answer, which gives ``450`` (the client retries), never ``550``, and is remembered
only :data:`TEMPORARY_MEMORY` seconds.

Storage: SQLite (``<spool>/tls-reachability.sqlite``, WAL), one short transaction per look;
without a path an in-memory database (tools, tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.domains import normalize_domain
from gateway.tls.levels import STRICTNESS

log = logging.getLogger("smg.tls")

STATE_FILE = "tls-reachability.sqlite"
TEMPORARY_MEMORY = 30.0  # a probe timeout / DNS failure is remembered this long (450 meanwhile)
MAX_ROWS = 20000  # answers kept at most (the oldest go first)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    domain TEXT NOT NULL, level TEXT NOT NULL, ok INTEGER NOT NULL, temporary INTEGER NOT NULL,
    reason TEXT NOT NULL, source TEXT NOT NULL, at REAL NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (domain, level));
CREATE TABLE IF NOT EXISTS leases (
    domain TEXT NOT NULL, level TEXT NOT NULL, holder TEXT NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (domain, level));
CREATE TABLE IF NOT EXISTS budget (
    sender TEXT NOT NULL, minute INTEGER NOT NULL, spent INTEGER NOT NULL,
    PRIMARY KEY (sender, minute));
"""


@dataclass(frozen=True)
class Answer:
    """Can the destination take mail at ``level``?  ``temporary``: we could not tell (probe
    timeout, DNS failure): the client should retry.  ``source``: delivery or probe."""

    domain: str
    level: str
    ok: bool
    temporary: bool
    reason: str
    source: str
    at: float


def _decides(have: str, want: str, ok: bool, temporary: bool) -> bool:
    """Does an answer at level ``have`` decide a question at ``want``?  Levels outside the
    ordered ones (``dane``) decide only themselves."""
    if have == want:
        return True
    if temporary or have not in STRICTNESS or want not in STRICTNESS:
        return False
    if ok:
        return STRICTNESS[have] >= STRICTNESS[want]
    return STRICTNESS[have] <= STRICTNESS[want]


class ReachabilityCache:
    """Answers per (recipient domain, level), probe leases and per-sender probe budgets."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self.holder = f"{os.getpid()}"
        self._db = self._open(path)

    def _open(self, path: Path | None) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(str(path) if path else ":memory:", timeout=2.0,
                                 isolation_level=None, check_same_thread=False)  # fmt: skip
            if path:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # a lost answer is only a new probe
            db.executescript(_SCHEMA)
            return db
        except sqlite3.Error as exc:  # an unusable spool directory: work from memory
            log.warning("cannot use %s: %s (kept in this process's memory only)", path, exc)
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            db.executescript(_SCHEMA)
            return db

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- answers --------------------------------------------------------------------------

    def answer(self, domain: str, level: str) -> Answer | None:
        """The freshest answer that decides ``level``: a success at ``level`` or a stricter
        one, a definitive failure at ``level`` or a weaker one (no STARTTLS fails ``verify``
        too), or a temporary answer at exactly ``level``."""
        key, now = normalize_domain(domain), self._clock()
        try:
            rows = self._db.execute(
                "SELECT level, ok, temporary, reason, source, at FROM answers "
                "WHERE domain = ? AND expires > ?",
                (key, now),
            ).fetchall()
        except sqlite3.Error as exc:
            log.warning("tls reachability lookup failed: %s", exc)
            return None
        relevant = [
            Answer(key, lv, bool(ok), bool(temp), reason, source, at)
            for lv, ok, temp, reason, source, at in rows
            if _decides(lv, level, bool(ok), bool(temp))
        ]
        return max(relevant, key=lambda a: a.at) if relevant else None

    def record(
        self, domain: str, level: str, ok: bool, reason: str, source: str, memory: float,
        temporary: bool = False,
    ) -> None:  # fmt: skip
        """Remember an answer for ``memory`` seconds (a temporary one at most
        :data:`TEMPORARY_MEMORY`).  A definitive answer replaces the others it contradicts."""
        if memory <= 0:
            return
        key, now = normalize_domain(domain), self._clock()
        if temporary:
            memory = min(memory, TEMPORARY_MEMORY)
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                if ok:  # a success at a level voids the failures it contradicts
                    self._delete_where(key, lambda lv: _decides(lv, level, False, False), 0)
                elif not temporary:  # a failure voids the successes it contradicts
                    self._delete_where(key, lambda lv: _decides(lv, level, True, False), 1)
                self._db.execute(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, level, int(ok), int(temporary), reason[:500], source, now, now + memory),
                )
                self._prune(now)
        except sqlite3.Error as exc:
            log.warning("tls reachability record failed: %s", exc)

    def _delete_where(self, key: str, levels: Callable[[str], bool], ok: int) -> None:
        rows = self._db.execute(
            "SELECT level FROM answers WHERE domain = ? AND ok = ?", (key, ok)
        ).fetchall()
        for (lv,) in rows:
            if levels(lv):
                self._db.execute("DELETE FROM answers WHERE domain = ? AND level = ?", (key, lv))

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM answers WHERE expires <= ?", (now,))
        self._db.execute("DELETE FROM leases WHERE until <= ?", (now,))
        self._db.execute("DELETE FROM budget WHERE minute < ?", (int(now // 60) - 1,))
        (count,) = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()
        if count > MAX_ROWS:
            self._db.execute(
                "DELETE FROM answers WHERE rowid IN "
                "(SELECT rowid FROM answers ORDER BY at LIMIT ?)",
                (count - MAX_ROWS,),
            )

    # -- leases and budgets ---------------------------------------------------------------

    def take_lease(self, domain: str, level: str, seconds: float) -> bool:
        """True if this process may probe (domain, level) now: nobody else holds a live lease."""
        key, now = normalize_domain(domain), self._clock()
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT until FROM leases WHERE domain = ? AND level = ?", (key, level)
                ).fetchone()
                if row is not None and row[0] > now:
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                    (key, level, self.holder, now + seconds),
                )
                return True
        except sqlite3.Error as exc:
            log.warning("tls reachability lease failed: %s", exc)
            return False

    def release_lease(self, domain: str, level: str) -> None:
        with contextlib.suppress(sqlite3.Error), self._db:
            self._db.execute(
                "DELETE FROM leases WHERE domain = ? AND level = ? AND holder = ?",
                (normalize_domain(domain), level, self.holder),
            )

    def spend(self, sender_domain: str, limit: int) -> bool:
        """Count one probe against ``sender_domain``'s budget for this minute; False (and
        nothing counted) when ``limit`` probes were made this minute already."""
        minute = int(self._clock() // 60)
        key = normalize_domain(sender_domain) if sender_domain else "<>"
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT spent FROM budget WHERE sender = ? AND minute = ?", (key, minute)
                ).fetchone()
                spent = row[0] if row else 0
                if spent >= limit:
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO budget VALUES (?, ?, ?)", (key, minute, spent + 1)
                )
                return True
        except sqlite3.Error as exc:
            log.warning("tls reachability budget failed: %s", exc)
            return False
