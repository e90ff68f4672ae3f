"""Queue ids, and owners: which relay process is delivering an active message.

An active message belongs to the process that enqueued or claimed it (``owner``).  Several
processes (``gateway.workers``) share one spool: each delivers what it owns, and takes over
active messages only from owners that are gone (crashed, or the relay restarted).  An owner
names the boot, the PID and the PID's start time, so a reused PID is not mistaken for it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sorts like the number
_id_lock = threading.Lock()
_last_micros = 0
_process_salt = secrets.randbelow(32 * 32)


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_queue_id() -> str:
    """13 characters, sortable by creation time: 11 for the microsecond clock (strictly
    increasing within the process) and 2 for a per-process salt, so that several processes
    writing to one spool do not collide (and a collision is retried on insert anyway)."""
    global _last_micros
    with _id_lock:
        micros = max(time.time_ns() // 1000, _last_micros + 1)
        _last_micros = micros
    return _base32(micros, 11) + _base32(_process_salt, 2)


_owner_cache: tuple[int, str] | None = None


def _boot_id() -> str:
    # Under systemd the unit passes the boot id (``SMG_BOOT_ID=%b``): its sandbox
    # (``ProcSubset=pid``) hides /proc/sys from the relay.
    from_unit = os.environ.get("SMG_BOOT_ID", "").replace("-", "")
    if from_unit:
        return from_unit[:8]
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_owner() -> str:
    """This process's owner name (recomputed after a fork)."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is None or _owner_cache[0] != pid:
        _owner_cache = (pid, f"{_boot_id()}:{pid}:{_start_time(pid)}")
    return _owner_cache[1]


def owner_alive(owner: str | None) -> bool:
    """Is the process named by ``owner`` still running (on this boot)?"""
    if not owner:
        return False
    boot, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if boot != _boot_id() or not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) == started
