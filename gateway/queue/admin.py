"""The operator's synchronous handle on the spool (``smg queue``), apart from the relay's
asynchronous :class:`~gateway.queue.spool.Spool`."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable

from gateway.queue import backlog, store
from gateway.queue.changes import announce_change
from gateway.queue.errors import SpoolUnavailable, UnknownMessage, unavailable
from gateway.queue.model import QueuedMessage
from gateway.queue.spool import resolve_path
from gateway.queue.store import BUSY_TIMEOUT


class SpoolAdmin:
    """The operator's handle (``smg queue``): plain synchronous SQLite on the same database,
    safe while the relay runs (WAL readers never block it; writes wait at most busy_timeout)."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = resolve_path(path)
        if not self.path.exists():
            raise SpoolUnavailable(f"no spool database at {self.path}")
        try:
            self.conn = store.connect(self.path, busy_timeout)
        except sqlite3.Error as exc:
            raise unavailable(f"cannot open spool {self.path}", exc) from exc

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
            raise unavailable(f"spool {self.path}", exc) from exc
        return changed

    def _require(self, queue_id: str) -> None:
        if not store.exists(self.conn, queue_id):
            raise UnknownMessage(queue_id)

    def list(self) -> list[QueuedMessage]:
        return store.list_messages(self.conn)

    def pages(
        self, after: str = "", limit: int | None = None, destination: str | None = None
    ) -> Iterable[QueuedMessage]:
        """The queue a page at a time (bounded memory, see :func:`backlog.pages`)."""
        return backlog.pages(self.conn, after, destination=destination, limit=limit)

    def flush_destination(self, destination: str) -> int:
        return self._write(
            lambda conn: backlog.flush_destination(conn, destination.lower(), time.time())
        )

    def show(self, queue_id: str) -> QueuedMessage:
        message = store.load_message(self.conn, queue_id)
        if message is None:
            raise UnknownMessage(queue_id)
        return message

    def hold(self, queue_id: str) -> int:
        self._require(queue_id)
        held = self._write(lambda conn: store.hold(conn, queue_id))
        announce_change(self.path.parent)
        return held

    def release(self, queue_id: str) -> int:
        self._require(queue_id)
        return self._write(lambda conn: store.release(conn, queue_id, time.time()))

    def delete(self, queue_id: str) -> int:
        self._require(queue_id)
        deleted = self._write(lambda conn: store.delete(conn, queue_id))
        announce_change(self.path.parent)
        return deleted

    def flush(self) -> int:
        return self._write(lambda conn: store.flush(conn, time.time()))

    def counts(self) -> dict[str, int]:
        return store.counts(self.conn)


def ids_of(messages: Iterable[QueuedMessage]) -> list[str]:
    return [m.id for m in messages]
