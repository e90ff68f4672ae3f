"""Postfix 3.7 run by hand as its own instance (never /etc/postfix): the one writer of its
``main.cf`` and ``master.cf``, and its queue directories.

Used by the lab's far ends (``lab/farend.py``), the test harness's far end
(``tests/harness/postfix.py``) and the benches' relay (``bench/postfix.py``); each keeps its own
settings and picks its services from :data:`DAEMONS`.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

POSTFIX_DAEMON_DIR = Path("/usr/lib/postfix/sbin")

# Queue subdirectories: name -> (owner, group, mode), as in /etc/postfix/postfix-files.  The
# master does not create them (``postfix check`` would).
QUEUE_DIRS = {
    "active": ("postfix", "root", 0o700),
    "bounce": ("postfix", "root", 0o700),
    "corrupt": ("postfix", "root", 0o700),
    "defer": ("postfix", "root", 0o700),
    "deferred": ("postfix", "root", 0o700),
    "flush": ("postfix", "root", 0o700),
    "hold": ("postfix", "root", 0o700),
    "incoming": ("postfix", "root", 0o700),
    "private": ("postfix", "root", 0o700),
    "saved": ("postfix", "root", 0o700),
    "trace": ("postfix", "root", 0o700),
    "maildrop": ("postfix", "postdrop", 0o730),
    "public": ("postfix", "postdrop", 0o710),
    "pid": ("root", "root", 0o755),
}


@dataclass(frozen=True)
class Service:
    """One master.cf line: service type private unpriv chroot wakeup maxproc command."""

    name: str
    type: str
    private: str
    unpriv: str
    chroot: str
    wakeup: str
    maxproc: str
    command: str

    def line(self) -> str:
        fields = (self.type, self.private, self.unpriv, self.chroot, self.wakeup, self.maxproc)
        return f"{self.name:<9} {' '.join(fields)} {self.command}"


def _service(name: str, columns: str, command: str | None = None) -> Service:
    kind, private, unpriv, chroot, wakeup, maxproc = columns.split()
    return Service(name, kind, private, unpriv, chroot, wakeup, maxproc, command or name)


# Postfix's stock services, none chrooted (the instances run from this machine's filesystem).
DAEMONS = {
    service.name: service
    for service in (
        _service("pickup", "unix n - n 60 1"),
        _service("cleanup", "unix n - n - 0"),
        _service("qmgr", "unix n - n 300 1"),
        _service("tlsmgr", "unix - - n 1000? 1"),
        _service("rewrite", "unix - - n - -", "trivial-rewrite"),
        _service("bounce", "unix - - n - 0"),
        _service("defer", "unix - - n - 0", "bounce"),
        _service("trace", "unix - - n - 0", "bounce"),
        _service("verify", "unix - - n - 1"),
        _service("flush", "unix n - n 1000? 0"),
        _service("proxymap", "unix - - n - -"),
        _service("smtp", "unix - - n - -"),
        _service("relay", "unix - - n - -", "smtp"),
        _service("showq", "unix n - n - -"),
        _service("error", "unix - - n - -"),
        _service("retry", "unix - - n - -", "error"),
        _service("discard", "unix - - n - -"),
        _service("virtual", "unix - n n - -"),
        _service("anvil", "unix - - n - 1"),
        _service("scache", "unix - - n - 1"),
        _service("postlog", "unix-dgram n - n - 1", "postlogd"),
    )
}


def smtpd(listen: str) -> Service:
    """The SMTP listener: ``smtp`` (port 25 on inet_interfaces) or ``address:port``."""
    return _service(listen, "inet n - n - -", "smtpd")


def master_cf(written_by: str, services: Iterable[Service | str]) -> str:
    """master.cf with ``services`` in order: a :class:`Service`, or the name of a stock one."""
    lines = [f"# written by {written_by}"]
    lines += [(DAEMONS[s] if isinstance(s, str) else s).line() for s in services]
    return "\n".join(lines) + "\n"


def main_cf(written_by: str, settings: Mapping[str, str]) -> str:
    """main.cf: one ``key = value`` line per setting, in order (an empty value clears it)."""
    lines = [f"# written by {written_by}"]
    lines += [f"{key} = {value}".rstrip() for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def make_owned_dir(path: Path, owner: str, group: str, mode: int) -> None:
    path.mkdir(exist_ok=True)
    os.chown(path, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)
    path.chmod(mode)


def make_queue_dirs(queue_dir: Path, data_dir: Path) -> None:
    """The queue and data directories with Postfix's own owners and modes."""
    queue_dir.mkdir(exist_ok=True)
    queue_dir.chmod(0o755)
    for name, (owner, group, mode) in QUEUE_DIRS.items():
        make_owned_dir(queue_dir / name, owner, group, mode)
    make_owned_dir(data_dir, "postfix", "root", 0o700)
