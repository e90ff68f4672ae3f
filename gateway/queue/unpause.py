"""``smg queue flush`` ends the pauses of the running relay, as ``postqueue -f`` unthrottles
Postfix's dead destinations.

A pause (gateway/delivery/shaping.py) lives in each relay process's memory, so the operator's
command cannot change it directly.  It appends a request line (``<unix time> <destination>``,
``*`` for every destination) to ``<spool directory>/unpause.requests``; each relay process
looks at the file's size and time at every scan (one ``stat``), reads it when it changed and
ends the pauses of the requests newer than the last it acted on.  Requests older than the
process are ignored (a restart has no pauses anyway).  The file is kept short: past
:data:`MAX_LINES` the writer keeps the newest half.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from gateway.files import keep_directory_owner

FILE_NAME = "unpause.requests"
EVERY = "*"
MAX_LINES = 200
MAX_READ = 64 * 1024  # a file larger than this is not ours: read only its tail


def request_unpause(spool_dir: str | os.PathLike[str], destination: str | None) -> None:
    """Ask the running relay to end the pause of ``destination`` (None: of every one)."""
    path = Path(spool_dir) / FILE_NAME
    target = (destination or EVERY).strip().lower()
    if not target or any(c.isspace() for c in target):
        raise ValueError(f"not a destination: {destination!r}")
    line = f"{time.time():.6f} {target}\n"
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        lines = path.read_text(errors="replace").splitlines(keepends=True)[-MAX_LINES:]
    if len(lines) >= MAX_LINES:  # rewrite the newest half and this one, atomically
        temporary = path.with_name(f".{FILE_NAME}.{os.getpid()}")
        temporary.write_text("".join(lines[-MAX_LINES // 2 :]) + line)
        keep_directory_owner(temporary)
        os.replace(temporary, path)
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line.encode())  # one short write: appends do not interleave
    finally:
        os.close(fd)
    keep_directory_owner(path)


class UnpauseRequests:
    """The relay's side: :meth:`new` gives the destinations asked for since the last call."""

    def __init__(self, spool_dir: str | os.PathLike[str], since: float | None = None) -> None:
        self.path = Path(spool_dir) / FILE_NAME
        self.acted_until = time.time() if since is None else since
        self._seen: tuple[int, int] | None = None

    def new(self) -> list[str | None]:
        """Destinations whose pause should end now (None: every destination)."""
        try:
            status = self.path.stat()
        except OSError:
            return []
        signature = (status.st_size, status.st_mtime_ns)
        if signature == self._seen:
            return []
        self._seen = signature
        try:
            with self.path.open("rb") as handle:
                handle.seek(max(0, status.st_size - MAX_READ))
                text = handle.read(MAX_READ).decode(errors="replace")
        except OSError:
            return []
        wanted: list[str | None] = []
        newest = self.acted_until
        for line in text.splitlines():
            stamp, _, target = line.partition(" ")
            try:
                when = float(stamp)
            except ValueError:
                continue  # a torn or foreign line: skip it, never fail the scan
            if when <= self.acted_until or not target:
                continue
            newest = max(newest, when)
            wanted.append(None if target == EVERY else target)
        self.acted_until = newest
        return wanted
