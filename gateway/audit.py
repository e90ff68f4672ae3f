"""The operators' audit trail: who changed what in the queue or a tenant's state, and why.

Every ``smg queue`` and ``smg tenant`` action that changes state is written as one JSON line to
``<gateway.spool>/audit.log`` and to the journal (syslog ``/dev/log``, identifier ``smg-audit``,
facility authpriv)::

    {"time": "2026-12-05T03:30:00Z", "user": "alice", "action": "queue.hold",
     "target": "0H1K2...", "reason": "customer asked", "result": "ok", "host": "mta01"}

``user`` is the operator behind ``sudo`` (``SUDO_USER``), else ``USER``/``LOGNAME``, else the
account the command runs as.  Use :func:`audited` around the change::

    with audited(config.gateway.spool, "tenant.suspend", name, args.reason):
        suspend(...)

The log is opened *before* the change: when it cannot be written the action is refused
(:class:`AuditUnavailable`), so nothing changes unaudited.  A change that raises is logged with
``result`` ``failed: <error>`` and the exception goes on.  Lines are appended with ``O_APPEND``
under ``flock`` so concurrent operators do not interleave; every string goes through
:func:`gateway.log.printable` (a reason cannot forge a line).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import json
import os
import socket
import syslog
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.files import keep_directory_owner
from gateway.log import printable

AUDIT_FILE = "audit.log"
MAX_REASON = 500  # characters kept of --reason (a line stays short)


class AuditUnavailable(Exception):
    """The audit log cannot be written: the action is refused."""


def operator() -> str:
    """The human behind the command: ``SUDO_USER`` first (``sudo smg ...``), then ``USER``."""
    for name in ("SUDO_USER", "USER", "LOGNAME"):
        value = os.environ.get(name)
        if value:
            return value
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        return f"uid:{os.getuid()}"


def audit_path(spool: str | os.PathLike[str]) -> Path:
    return Path(spool) / AUDIT_FILE


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot write the audit log {path}: {exc.strerror}; run as the relay's user or root"
        ) from None
    keep_directory_owner(path)  # made by "sudo smg ...": the relay's user must append too
    return fd


def entry(action: str, target: str, reason: str | None, result: str, **details: Any) -> dict:
    """One audit record (strings escaped, the reason cut to :data:`MAX_REASON`)."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    record: dict[str, Any] = {
        "time": now,
        "user": printable(operator()),
        "action": printable(action),
        "target": printable(str(target)),
        "reason": printable(reason[:MAX_REASON]) if reason else None,
        "result": printable(result),
        "host": socket.gethostname(),
    }
    for key, value in details.items():
        record.setdefault(key, printable(value) if isinstance(value, str) else value)
    return record


def _append(fd: int, record: dict) -> None:
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _journal(record: dict) -> None:
    """The same record in the journal (journald reads /dev/log); best effort."""
    text = " ".join(
        f"{key}={json.dumps(value, ensure_ascii=True)}" for key, value in record.items()
    )
    with contextlib.suppress(OSError):
        syslog.openlog("smg-audit", 0, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_NOTICE, text)
        syslog.closelog()


@contextlib.contextmanager
def audited(
    spool: str | os.PathLike[str],
    action: str,
    target: str,
    reason: str | None,
    **details: Any,
) -> Iterator[dict]:
    """Run the body as an audited change.  The yielded dict may get more fields (a count),
    and ``result`` when the action was refused without an exception."""
    fd = _open(audit_path(spool))
    extra: dict[str, Any] = dict(details)
    try:
        try:
            yield extra
        except BaseException as exc:
            record = entry(action, target, reason, f"failed: {type(exc).__name__}: {exc}", **extra)
            _append(fd, record)
            _journal(record)
            raise
        result = str(extra.pop("result", "ok"))
        record = entry(action, target, reason, result, **extra)
        _append(fd, record)
        _journal(record)
    finally:
        os.close(fd)


def record(
    spool: str | os.PathLike[str], action: str, target: str, reason: str | None, **details: Any
) -> dict:
    """Log a change that already happened (prefer :func:`audited`, which refuses first)."""
    fd = _open(audit_path(spool))
    try:
        rec = entry(action, target, reason, "ok", **details)
        _append(fd, rec)
        _journal(rec)
        return rec
    finally:
        os.close(fd)


def read(spool: str | os.PathLike[str]) -> list[dict]:
    """Every record of ``<spool>/audit.log`` (tests, ``smg`` diagnostics)."""
    path = audit_path(spool)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
