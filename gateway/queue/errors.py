"""What the spool raises when it cannot do its work (the intake answers 4xx for these)."""

from __future__ import annotations

import errno
import sqlite3

_SQLITE_FULL = 13  # the primary result code (sqlite_errorcode & 0xFF)


class SpoolUnavailable(Exception):
    """The spool cannot take or change messages now (disk full, not writable, I/O error)."""


class SpoolDamaged(SpoolUnavailable):
    """The spool database failed SQLite's integrity check at start: the relay refuses to run on
    it (runbook: docs/queue.md, "Damaged spool")."""


class SpoolFull(SpoolUnavailable):
    """The disk (or the database's size limit) is full: the intake answers 452 4.3.1."""


class UnknownMessage(KeyError):
    """No message with this queue id (never was, or already delivered or deleted)."""

    def __str__(self) -> str:
        return f"no message with queue id {self.args[0]!r} in the queue"


def is_full(exc: BaseException) -> bool:
    """``exc`` says the storage is full: ENOSPC/EDQUOT, or SQLite's SQLITE_FULL."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == _SQLITE_FULL
    return False


def unavailable(message: str, exc: BaseException) -> SpoolUnavailable:
    """The spool error for ``exc``: :class:`SpoolFull` when the storage is full."""
    kind = SpoolFull if is_full(exc) else SpoolUnavailable
    return kind(f"{message}: {exc}")
