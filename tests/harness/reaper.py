"""Run one daemon under a tiny supervisor that leaves nothing behind.

Usage: python reaper.py COMMAND [ARGS...]

- becomes a child subreaper, so processes the daemon orphans (Postfix's master exits before
  its children do) are re-parented here and reaped, instead of piling up as zombies;
- forwards SIGTERM/SIGINT to the daemon; once the daemon exits, waits (bounded) for its
  remaining descendants and SIGKILLs the stragglers;
- the harness starts it with a parent-death signal, so if the test run dies the daemon is
  still stopped.
Exits with the daemon's exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
DRAIN_SECONDS = 8.0


def prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl failed")


def direct_children() -> list[int]:
    me = str(os.getpid())
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            children.append(int(entry))
    return children


def drain(deadline: float) -> None:
    """Reap descendants until none are left; SIGKILL whoever is still there at `deadline`."""
    killed = False
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        if time.monotonic() > deadline:
            if killed:
                return  # unkillable (D state): give up rather than hang
            for child in direct_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 2.0
        time.sleep(0.02)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: reaper.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    daemon = os.fork()
    if daemon == 0:
        os.setpgid(0, 0)  # its own process group, as daemons expect
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        if pid == daemon:
            status = os.waitstatus_to_exitcode(wait_status)
            break
    drain(time.monotonic() + DRAIN_SECONDS)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
