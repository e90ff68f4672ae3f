"""``<spool>/tenants.sqlite``: what the workers of one host share about the customers.

- ``sessions``: open SMTP sessions per (process, customer, client address), so the session
  limits hold across workers; rows of a process that is gone are dropped when a worker starts;
- ``usage``: per customer and minute, the messages and recipients queued and the verdicts
  (messages seen, spam, rejected).  The hourly limits and the suspension window are sums over
  the last 60 minutes / ``suspend_window`` (a sliding window in one-minute steps);
- ``status``: the suspension (who, when, why) and ``window_start``: verdicts before it do not
  count, so a customer resumed by an operator is not suspended again at once by the old window.

One short transaction per call (WAL, ``synchronous=NORMAL``: losing the last minute of usage
in a power cut is acceptable, a suspension is written with FULL).  ``smg tenant`` opens the
same file, so a suspend or resume takes effect at the next MAIL of every worker.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.files import keep_directory_owner

DB_NAME = "tenants.sqlite"
BUSY_TIMEOUT = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    pid INTEGER NOT NULL, tenant TEXT NOT NULL, ip TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (pid, tenant, ip));
CREATE INDEX IF NOT EXISTS sessions_ip ON sessions (tenant, ip);
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL, minute INTEGER NOT NULL,
    messages INTEGER NOT NULL DEFAULT 0, recipients INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL DEFAULT 0, spam INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, minute));
CREATE TABLE IF NOT EXISTS status (
    tenant TEXT PRIMARY KEY, suspended INTEGER NOT NULL DEFAULT 0, since REAL,
    reason TEXT, by TEXT, window_start REAL NOT NULL DEFAULT 0);
"""


@dataclass(frozen=True)
class Status:
    tenant: str
    suspended: bool = False
    since: float | None = None
    reason: str = ""
    by: str = ""


@dataclass(frozen=True)
class Window:
    seen: int
    spam: int
    rejected: int


def _minute(now: float) -> int:
    return int(now // 60)


class TenantState:
    def __init__(self, path: str | os.PathLike[str], clock: object = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._pruned = -1  # the minute usage was last pruned in
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT,
                                    check_same_thread=False)  # fmt: skip
        self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self.conn.execute(statement)
        # ``sudo smg tenant`` may create the files: they stay the relay's
        keep_directory_owner(self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))

    @classmethod
    def in_spool(cls, spool: str | os.PathLike[str]) -> TenantState:
        return cls(Path(spool) / DB_NAME)

    def now(self) -> float:
        return float(self.clock())  # type: ignore[operator]

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _write(self):  # type: ignore[no-untyped-def]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # --- sessions ---------------------------------------------------------------------

    def drop_dead_sessions(self) -> None:
        """Rows of processes that are gone (a crashed worker) stop counting."""
        with self._write() as conn:
            for (pid,) in conn.execute("SELECT DISTINCT pid FROM sessions").fetchall():
                if not _alive(pid):
                    conn.execute("DELETE FROM sessions WHERE pid = ?", (pid,))

    def open_session(self, tenant: str, ip: str, max_sessions: int, max_per_ip: int) -> str | None:
        """Count one more session, or the limit it would pass (``max_sessions``,
        ``max_sessions_per_ip``) and count nothing."""
        with self._write() as conn:
            (total,) = conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM sessions WHERE tenant = ?", (tenant,)
            ).fetchone()
            if total >= max_sessions:
                return "max_sessions"
            (from_ip,) = conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM sessions WHERE tenant = ? AND ip = ?",
                (tenant, ip),
            ).fetchone()
            if from_ip >= max_per_ip:
                return "max_sessions_per_ip"
            conn.execute(
                "INSERT INTO sessions (pid, tenant, ip, n) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (pid, tenant, ip) DO UPDATE SET n = n + 1",
                (os.getpid(), tenant, ip),
            )
        return None

    def close_session(self, tenant: str, ip: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE sessions SET n = n - 1 WHERE pid = ? AND tenant = ? AND ip = ?",
                (os.getpid(), tenant, ip),
            )
            conn.execute("DELETE FROM sessions WHERE n <= 0")

    def sessions(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT tenant, SUM(n) FROM sessions GROUP BY tenant")
        return {tenant: int(n) for tenant, n in rows}

    # --- usage --------------------------------------------------------------------------

    def record(self, tenant: str, *, messages: int = 0, recipients: int = 0, seen: int = 0,
               spam: int = 0, rejected: int = 0) -> None:  # fmt: skip
        with self._write() as conn:
            conn.execute(
                "INSERT INTO usage (tenant, minute, messages, recipients, seen, spam, rejected)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, minute) DO UPDATE SET"
                " messages = messages + excluded.messages,"
                " recipients = recipients + excluded.recipients, seen = seen + excluded.seen,"
                " spam = spam + excluded.spam, rejected = rejected + excluded.rejected",
                (tenant, _minute(self.now()), messages, recipients, seen, spam, rejected),
            )
            if _minute(self.now()) != self._pruned:  # once a minute: old minutes go
                self._pruned = _minute(self.now())
                conn.execute("DELETE FROM usage WHERE minute < ?", (self._pruned - 1441,))

    def last_hour(self, tenant: str) -> tuple[int, int, int]:
        """(messages, recipients, seconds until the oldest minute leaves the hour)."""
        first = _minute(self.now()) - 59
        row = self.conn.execute(
            "SELECT COALESCE(SUM(messages), 0), COALESCE(SUM(recipients), 0), MIN(minute)"
            " FROM usage WHERE tenant = ? AND minute >= ?",
            (tenant, first),
        ).fetchone()
        oldest = row[2] if row[2] is not None else first
        retry = max(1, int((oldest + 60) * 60 - self.now()))
        return int(row[0]), int(row[1]), retry

    def window(self, tenant: str, seconds: float) -> Window:
        """Verdicts of the last ``seconds`` (whole minutes), none before ``window_start``."""
        first = _minute(self.now() - seconds) + 1
        resumed = self.status(tenant).since_resume
        if resumed:  # the minute of the resume is left out whole: its verdicts were before
            first = max(first, _minute(resumed) + 1)
        row = self.conn.execute(
            "SELECT COALESCE(SUM(seen), 0), COALESCE(SUM(spam), 0), COALESCE(SUM(rejected), 0)"
            " FROM usage WHERE tenant = ? AND minute >= ?",
            (tenant, first),
        ).fetchone()
        return Window(*map(int, row))

    # --- suspension ---------------------------------------------------------------------

    def status(self, tenant: str) -> _Row:
        row = self.conn.execute(
            "SELECT suspended, since, reason, by, window_start FROM status WHERE tenant = ?",
            (tenant,),
        ).fetchone()
        if row is None:
            return _Row(Status(tenant), 0.0)
        return _Row(Status(tenant, bool(row[0]), row[1], row[2] or "", row[3] or ""), row[4])

    def suspended(self, tenant: str) -> bool:
        row = self.conn.execute(
            "SELECT suspended FROM status WHERE tenant = ?", (tenant,)
        ).fetchone()
        return bool(row and row[0])

    def suspend(self, tenant: str, reason: str, by: str) -> bool:
        """Suspend; True only for the call that changed the state (notify once)."""
        self.conn.execute("PRAGMA synchronous = FULL")
        try:
            with self._write() as conn:
                conn.execute("INSERT OR IGNORE INTO status (tenant) VALUES (?)", (tenant,))
                changed = conn.execute(
                    "UPDATE status SET suspended = 1, since = ?, reason = ?, by = ?"
                    " WHERE tenant = ? AND suspended = 0",
                    (self.now(), reason, by, tenant),
                ).rowcount
        finally:
            self.conn.execute("PRAGMA synchronous = NORMAL")
        return changed == 1

    def resume(self, tenant: str, reason: str, by: str) -> bool:
        """Lift a suspension and restart the verdict window (the old verdicts no longer
        count); True if it was suspended."""
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO status (tenant) VALUES (?)", (tenant,))
            changed = conn.execute(
                "UPDATE status SET suspended = 0, since = ?, reason = ?, by = ?,"
                " window_start = ? WHERE tenant = ? AND suspended = 1",
                (self.now(), reason, by, self.now(), tenant),
            ).rowcount
        return changed == 1

    def all_status(self) -> dict[str, Status]:
        rows = self.conn.execute("SELECT tenant FROM status").fetchall()
        return {name: self.status(name).status for (name,) in rows}


@dataclass(frozen=True)
class _Row:
    status: Status
    since_resume: float  # window_start


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
