"""A signal that a queued message's state was changed from outside its relay process.

A new message is handed from the intake to delivery in memory, without a second read of the
spool (gateway/delivery/scheduler.py).  Meanwhile an operator (``smg queue hold|delete``) or a
customer's suspension (the hold sweep, in any worker) may have held or deleted it; the attempt
must then not happen.  Asking the spool before every attempt costs a read per message, which is
what the relay does least of under load.  Instead every such change appends a byte to
``<spool directory>/spool.changes`` after its commit; a hand-off remembers the file's identity
and size when it was made, and only when they differ at its turn is its state read again.  One
``stat`` per message, no read of the spool while nobody acts on the queue.

A change committed in the microseconds before its byte is appended meets the attempt as a
change during an attempt does: the hold wins for every later attempt (``finish_attempt``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from gateway.files import keep_directory_owner

log = logging.getLogger("smg.queue")

FILE_NAME = "spool.changes"
MAX_SIZE = 4096  # beyond, the file starts again as a new one (a new inode is a change too)

# (inode, size, mtime in ns): a rollover's new file could reuse an old inode, not its time too.
Signature = tuple[int, int, int] | None  # None: no change ever announced


def announce_change(spool_dir: str | os.PathLike[str]) -> None:
    """Tell the relay processes that messages were held or deleted (after the commit).  The
    change itself is committed: a file that cannot be written is logged, not raised."""
    try:
        _append(Path(spool_dir) / FILE_NAME)
    except OSError as exc:
        log.warning("could not announce a spool change in %s: %s", spool_dir, exc)


def _append(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size >= MAX_SIZE:
            fresh = path.with_name(f".{FILE_NAME}.{os.getpid()}")
            fresh.write_bytes(b"\n")
            keep_directory_owner(fresh)
            os.replace(fresh, path)
            return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, b"\n")
    finally:
        os.close(fd)
    keep_directory_owner(path)


class ChangeSignal:
    """The relay's side: the file's signature, to compare a hand-off's with."""

    def __init__(self, spool_dir: str | os.PathLike[str]) -> None:
        self.path = Path(spool_dir) / FILE_NAME

    def signature(self) -> Signature:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return (status.st_ino, status.st_size, status.st_mtime_ns)
