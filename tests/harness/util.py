"""Small building blocks shared by every daemon of the test harness.

- `free_port(addr)`: a port that was free on `addr` a moment ago (bind port 0, close).
- `common_port(*ips)`: one TCP port free on several addresses (far ends sharing an MX port).
- `wait_for(predicate, timeout)`: bounded polling, raises `TimeoutError` with a description.
- `Daemon`: base class for a daemon the harness starts by hand in its own temp dir: start()
  writes the config, spawns the process, waits (bounded) for readiness and raises
  `DaemonStartError` carrying the log tail if it does not come up; stop() ends it by PID
  (SIGTERM, bounded wait, SIGKILL) and never touches any other process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "tests" / "data"
# Per-machine cache shared by test runs (rspamd's compiled regex cache, ...).
CACHE_DIR = Path(os.environ.get("SMG_TEST_CACHE", "/var/tmp/smg-test-cache"))
# Every daemon runs under this supervisor: it reaps orphans and stops the daemon with us.
REAPER = Path(__file__).with_name("reaper.py")
PR_SET_PDEATHSIG = 1


class HarnessError(RuntimeError):
    """Something in the test harness itself went wrong."""


class DaemonStartError(HarnessError):
    """A daemon did not become ready; the message carries the tail of its log."""


def free_port(addr: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """Return a port that is currently free on `addr` for TCP (and, for DNS, also UDP).

    There is a small window between this check and the daemon binding the port; daemons that
    fail with "address in use" are retried by `Daemon.start()` with fresh ports.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((addr, 0))
            port = sock.getsockname()[1]
        if _udp_and_tcp_free(addr, port):
            return port
    raise HarnessError(f"no free port found on {addr} after 50 tries")


def common_port(*ips: str) -> int:
    """A TCP port free on every one of `ips`: `delivery.port` is one port for every MX."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((ips[0], 0))
            port = probe.getsockname()[1]
        try:
            for ip in ips:
                with socket.socket() as other:
                    other.bind((ip, port))
            return port
        except OSError:
            continue
    raise HarnessError(f"no common free port on {', '.join(ips)} after 50 tries")


def _udp_and_tcp_free(addr: str, port: int) -> bool:
    """True if both TCP and UDP `port` can be bound on `addr` (DNS needs both)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((addr, port))
            except OSError:
                return False
    return True


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` seconds pass.

    Exceptions raised by the predicate count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except Exception as exc:  # a daemon that is not up yet refuses connections etc.
            last_error = exc
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


def tcp_connectable(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    """Last `lines` lines of a log file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log file {path})"
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Field 3 (after the parenthesised command name) is the state; Z = zombie.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def terminate_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM `pid`, wait up to `timeout` s for it to go, then SIGKILL (bounded)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        _reap(pid)
        time.sleep(0.02)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 5.0
        while time.monotonic() < kill_deadline and pid_alive(pid):
            _reap(pid)
            time.sleep(0.02)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test run (our parent) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run(cmd: Sequence[str], timeout: float = 30.0, check: bool = True) -> str:
    """Run a short helper command, return stdout+stderr; raise HarnessError on failure."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output}")
    return output


class Daemon:
    """Base for a hand-started daemon living in its own temp dir.

    Subclasses implement `_prepare()` (pick ports, write config; called on each start attempt),
    `_command()` (argv of the foreground process) and `_ready()` (True once it serves). The
    command runs under tests/harness/reaper.py, whose PID is the one stopped.
    """

    name = "daemon"
    start_timeout = 20.0
    stop_timeout = 10.0
    start_attempts = 3

    def __init__(self, workdir: Path | None = None) -> None:
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"smg-{self.name}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- to implement -----------------------------------------------------------------------
    def _prepare(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _forget_ports(self) -> None:
        """Drop chosen ports so the next `_prepare()` picks fresh ones (after "in use")."""

    def _console_log(self) -> Path:
        """Where the spawned process's stdout/stderr go."""
        return self.dir / f"{self.name}.console.log"

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        pid = self._pid()
        return pid is not None and pid_alive(pid)

    def start(self) -> None:
        """Start and wait until ready; retries with fresh ports if an address was taken."""
        if self.running:
            return
        last: DaemonStartError | None = None
        for _ in range(self.start_attempts):
            try:
                self._start_once()
                return
            except DaemonStartError as exc:
                last = exc
                self.stop()
                if "in use" not in str(exc).lower():
                    break
                self._forget_ports()
        assert last is not None
        raise last

    def _start_once(self) -> None:
        self._prepare()
        with open(self._console_log(), "ab") as console:
            self.proc = subprocess.Popen(
                [sys.executable, str(REAPER), *self._command()],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,  # our Ctrl-C goes to pytest, not straight to the daemon
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._start_error(f"exited with status {self.proc.returncode}")
            try:
                if self._ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.03)
        raise self._start_error(f"not ready after {self.start_timeout:.0f}s")

    def _start_error(self, why: str) -> DaemonStartError:
        tails = [f"--- {p.name} ---\n{log_tail(p)}" for p in self._log_files() if p.exists()]
        return DaemonStartError(f"{self.name} in {self.dir} {why}\n" + "\n".join(tails))

    def _log_files(self) -> list[Path]:
        return [self._console_log(), self.log_path]

    def stop(self) -> None:
        """Stop by PID (SIGTERM, bounded wait, SIGKILL). Safe to call when not running."""
        pid = self._pid()
        if pid is not None:
            terminate_pid(pid, self.stop_timeout)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
        self.proc = None

    def close(self) -> None:
        """Stop and remove the temp dir (when the harness created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self._log_files() if p.exists())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
