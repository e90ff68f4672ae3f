"""The counters of every worker in worker 0's ``/metrics`` (``gateway.workers`` > 1).

Each worker is a process with its own counters, and only worker 0 serves the endpoint (one
scrape target per host, as the alert rules and dashboards expect).  So every other worker
writes its counters to ``<spool>/metrics/worker-<N>.json`` every :data:`INTERVAL` seconds (and
when it stops), atomically; worker 0 adds them to its own at each scrape.  A file names the
supervisor it belongs to (its pid): files of an earlier run of the service, or of workers beyond
``gateway.workers``, are never counted.  A scrape is at most :data:`INTERVAL` behind for the
other workers' share; a worker that is restarted starts again at 0 (Prometheus' ``rate()`` takes
that as a counter reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from gateway.metrics import Metrics
from gateway.queue.spool import resolve_path

log = logging.getLogger("smg.metrics")

DIR_NAME = "metrics"
INTERVAL = 5.0


def share_dir(spool: str | os.PathLike[str]) -> Path:
    """Beside the spool database (``gateway.spool`` names its directory, or in tests the file)."""
    return resolve_path(spool).parent / DIR_NAME


class CounterShare:
    """One worker's side: :meth:`publish` (workers > 0) or :meth:`peers` (worker 0)."""

    def __init__(self, spool: str | os.PathLike[str], index: int, workers: int,
                 run_id: str | None = None) -> None:  # fmt: skip
        self.dir = share_dir(spool)
        self.index, self.workers = index, workers
        self.run_id = run_id or str(os.getppid())  # the supervisor: one per service start
        self._task: asyncio.Task[None] | None = None

    def _path(self, index: int) -> Path:
        return self.dir / f"worker-{index}.json"

    # -- workers 1..N-1 ----------------------------------------------------------------------

    def write(self, metrics: Metrics) -> None:
        self.dir.mkdir(mode=0o750, exist_ok=True)
        temporary = self.dir / f".worker-{self.index}.{os.getpid()}"
        data = {"run": self.run_id, "worker": self.index, "counters": metrics.counter_snapshot()}
        temporary.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(temporary, self._path(self.index))

    def start(self, metrics: Metrics) -> None:
        async def loop() -> None:
            while True:
                try:
                    self.write(metrics)
                except OSError as exc:  # the spool is full or read-only: the relay goes on
                    log.warning("metrics: cannot share worker %d's counters: %s", self.index, exc)
                await asyncio.sleep(INTERVAL)

        self._task = asyncio.get_running_loop().create_task(loop(), name="smg-metrics-share")

    async def stop(self, metrics: Metrics) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            self.write(metrics)  # the last counts, until this worker's successor writes

    # -- worker 0 ------------------------------------------------------------------------------

    def forget_others(self) -> None:
        """At worker 0's start: files of workers beyond ``gateway.workers`` go."""
        with contextlib.suppress(OSError):
            for path in self.dir.glob("worker-*.json"):
                index = path.stem.removeprefix("worker-")
                if not index.isdigit() or int(index) >= self.workers:
                    path.unlink(missing_ok=True)

    def peers(self) -> list[dict[str, Any]]:
        """The other workers' counters of this run (a file being replaced, torn or foreign
        is skipped: the next scrape has it)."""
        out = []
        for index in range(1, self.workers):
            try:
                data = json.loads(self._path(index).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("run") == self.run_id:
                counters = data.get("counters")
                if isinstance(counters, dict):
                    out.append(counters)
        return out
