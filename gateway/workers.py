"""Several relay processes on one host (``gateway.workers`` > 1).

One Python process uses one core.  With ``workers = N`` the ``smg serve`` process becomes a
small supervisor that forks N workers; each is a whole relay (intake, policy, delivery) on the
same listen addresses (``SO_REUSEPORT``: the kernel spreads new connections over them) and the
same spool.  Each worker delivers the mail it accepted (the in-memory hand-off) and polls the
spool for retries; an active message belongs to the worker that has it (the spool's ``owner``),
and a worker takes over another's active mail only once that worker is gone.

Signals to the supervisor go to every worker: SIGTERM/SIGINT stop them (each drains as a single
relay does), SIGHUP makes each reload its config.  A worker that dies is started again (at most
``MAX_RESTARTS`` in ``RESTART_WINDOW`` seconds; beyond that, or if a worker cannot start at all,
the supervisor stops the others and exits non-zero so that systemd restarts the service).
Worker 0 alone serves the metrics endpoint (``gateway.metrics_listen``); the queue gauge is
read from the shared spool, the counters are every worker's (``gateway.metrics_share``: the
others write theirs to the spool every few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.log import event, setup_logging

log = logging.getLogger("smg.workers")

WORKER_ENV = "SMG_WORKER"  # the worker's index, read by gateway.server
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
START_GRACE = 5.0  # a worker that exits with an error this soon cannot start at all
EX_CONFIG = 78  # gateway.server: the configuration is invalid
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_TIMEOUT = 60.0


def worker_index() -> int:
    """This process's worker index (0 when not run under the supervisor)."""
    try:
        return int(os.environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def run_event_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """``asyncio.run(main())``.  (uvloop was tried: about 5 % less CPU per message, but
    aiosmtpd then missed clients that close right after connecting, so it is not used.)"""
    return int(asyncio.run(main()) or 0)


def _stop_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, so no worker goes on orphaned
    (on the same port as the workers of the next start)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor died before prctl: do not serve
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, workers: int, serve_worker: Callable[[], int], log_format: str) -> None:
        self.workers = workers
        self.serve_worker = serve_worker
        self.log_format = log_format
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self.restarts: list[float] = []
        self.stopping = False
        self.exit_code = 0

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                _stop_with_parent()
                os.environ[WORKER_ENV] = str(index)
                code = self.serve_worker()
            except BaseException:
                logging.getLogger("smg.workers").exception("worker %d failed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())
        event(log, "worker_started", worker=index, pid=pid)

    def _forward(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def run(self) -> int:
        setup_logging(self.log_format)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        for index in range(self.workers):
            self._spawn(index)
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.children:
                continue
            index, started = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            self._exited(index, pid, code, started)
        return self.exit_code

    def _exited(self, index: int, pid: int, code: int, started: float) -> None:
        if self.stopping:
            self.exit_code = max(self.exit_code, code if code > 0 else 0)
            return
        level = logging.ERROR
        event(log, "worker_exited", level=level, worker=index, pid=pid, code=code)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
        cannot_start = code == EX_CONFIG or (code > 0 and now - started < START_GRACE)
        if cannot_start or len(self.restarts) >= MAX_RESTARTS:
            # Bad config, port taken, or it keeps dying: stop, let systemd act.
            self.exit_code = code if code > 0 else 1
            self._stop_all()
            return
        self.restarts.append(now)
        self._spawn(index)

    def _stop_all(self) -> None:
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.children and time.monotonic() < deadline:
            for pid in list(self.children):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.children.pop(pid)
            time.sleep(0.05)
        for pid in list(self.children):  # still there after the grace time
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.children.pop(pid)


def supervise(workers: int, serve_worker: Callable[[], int], log_format: str = "text") -> int:
    """Run ``serve_worker()`` in ``workers`` forked processes until stopped; the exit code."""
    return Supervisor(workers, serve_worker, log_format).run()
