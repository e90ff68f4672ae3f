"""Running commands and keeping daemons by PID, with every wait bounded."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lab.config import LOG_DIR, PID_DIR

log = logging.getLogger("lab")


class LabError(RuntimeError):
    """A lab step failed; the message says which and where to look."""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float = 60,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing output; raise LabError on failure if check."""
    args = [str(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:.0f} s: {' '.join(args)}") from exc
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[-2000:]
        raise LabError(f"failed ({done.returncode}): {' '.join(args)}\n{detail}")
    return done


def wait_until(
    what: str, predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1
) -> None:
    """Poll predicate until true; bounded by timeout (and so by a count of tries)."""
    deadline = time.monotonic() + timeout
    tries = max(1, int(timeout / interval) + 1)
    for _ in range(tries):
        if predicate():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- daemons kept by PID -------------------------------------------------------------------------


def start_time(pid: int) -> str | None:
    """The process start time in clock ticks: with the PID, identifies one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after it are fixed.
    return stat.rsplit(")", 1)[1].split()[19]


def pid_file(name: str) -> Path:
    return PID_DIR / f"{name}.pid"


def log_file(name: str) -> Path:
    return LOG_DIR / f"{name}.log"


def start_daemon(name: str, argv: Sequence[str | os.PathLike[str]]) -> int:
    """Start a long-running process in its own session; keep PID + start time in a pid file."""
    PID_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    args = [str(a) for a in argv]
    log.debug("start %s: %s", name, " ".join(args))
    with open(log_file(name), "ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid_file(name).write_text(f"{proc.pid} {start_time(proc.pid)}\n")
    return proc.pid


def daemon_pid(name: str) -> int | None:
    """The PID of a daemon we started, if that very process is still alive."""
    try:
        pid_text, started = pid_file(name).read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_text)
    if start_time(pid) != started or is_zombie(pid):
        return None
    return pid


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (started in this same run)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_daemon(name: str, *, timeout: float = 10) -> None:
    """SIGTERM the daemon, wait (bounded), then SIGKILL it and what is left of its session."""
    pid = daemon_pid(name)
    if pid is not None:
        log.debug("stop %s (pid %d)", name, pid)
        # Processes in the session we created for it are ours too: note them while the leader
        # lives, so that afterwards we kill exactly those (checked by start time), nothing else.
        members = session_members(pid)
        _signal(pid, signal.SIGTERM)
        try:
            wait_until(f"{name} to exit", lambda: _gone(pid, name), timeout=timeout)
        except LabError:
            log.warning("%s did not exit after SIGTERM in %.0f s: SIGKILL", name, timeout)
            _signal(pid, signal.SIGKILL)
            wait_until(f"{name} to die", lambda: _gone(pid, name), timeout=5)
        kill_exact(members)
    pid_file(name).unlink(missing_ok=True)


def _gone(pid: int, name: str) -> bool:
    _reap(pid)
    return daemon_pid(name) is None


def session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process in session sid, the leader excluded."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == sid:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            members.append((int(entry.name), fields[19]))
    return members


def children_of(ppid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the direct children of ppid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            found.append((int(entry.name), fields[19]))
    return found


def kill_exact(processes: list[tuple[int, str]]) -> None:
    """SIGKILL each (pid, start time) that is still that same process."""
    for pid, started in processes:
        if start_time(pid) == started:
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def processes_mentioning(path: Path, programs: frozenset[str]) -> list[tuple[int, str]]:
    """(pid, start time) of processes running one of programs with path in their arguments.

    Our daemons take their config from the run dir, so this finds one started just before its
    pid file was written; programs keeps out anyone else reading a file there (tail, grep).
    """
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        program = os.path.basename(cmdline.split(b"\0", 1)[0].decode(errors="replace"))
        if needle not in cmdline or program not in programs:
            continue
        started = start_time(int(entry.name))
        if started is not None and not is_zombie(int(entry.name)):
            found.append((int(entry.name), started))
    return found


def known_daemons() -> list[str]:
    if not PID_DIR.is_dir():
        return []
    return sorted(p.stem for p in PID_DIR.glob("*.pid"))


def log_tail(name: str, lines: int = 15) -> str:
    try:
        text = log_file(name).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
