"""The blacklist check's state for Prometheus: a node-exporter textfile (``blacklist.prom``).

``smg blacklist check --textfile DIR/blacklist.prom`` writes, after every check::

    smg_blacklist_listed{address="198.51.100.10",zone="dnsbl.example",list="...",major="1"} 1
    smg_blacklist_unknown{address=...,zone=...,list=...,major=...} 0
    smg_blacklist_check_timestamp_seconds 1.7e9
    smg_blacklist_check_exit_code 0

node exporter's textfile collector (``--collector.textfile.directory``) serves it with the host's
metrics; the alert rules fire on a listing and on a check that stopped running.  The file is
written to a temporary name and renamed, so a scrape never sees half of it.  A check that could
not run at all writes only the timestamp and exit code 3.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gateway.blacklist.answers import LISTED, UNKNOWN
from gateway.blacklist.lookup import Result
from gateway.metrics import _escape


def _labels(result: Result) -> str:
    pairs = {
        "address": result.ip,
        "zone": result.zone,
        "list": result.list_name,
        "major": "1" if result.major else "0",
    }
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs.items()) + "}"


def render(results: list[Result], exit_code: int, now: float | None = None) -> str:
    lines = [
        "# HELP smg_blacklist_listed 1 if the address is listed on the DNSBL at the last check.",
        "# TYPE smg_blacklist_listed gauge",
        *(f"smg_blacklist_listed{_labels(r)} {int(r.status == LISTED)}" for r in results),
        "# HELP smg_blacklist_unknown 1 if the DNSBL gave no usable answer at the last check.",
        "# TYPE smg_blacklist_unknown gauge",
        *(f"smg_blacklist_unknown{_labels(r)} {int(r.status == UNKNOWN)}" for r in results),
        "# HELP smg_blacklist_check_timestamp_seconds When the last blacklist check finished.",
        "# TYPE smg_blacklist_check_timestamp_seconds gauge",
        f"smg_blacklist_check_timestamp_seconds {int(now if now is not None else time.time())}",
        "# HELP smg_blacklist_check_exit_code The last check's Nagios exit code (0 clean).",
        "# TYPE smg_blacklist_check_exit_code gauge",
        f"smg_blacklist_check_exit_code {exit_code}",
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    """Atomically: a temporary file in the same directory, then rename; readable by all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.chmod(0o644)
    os.replace(temporary, path)
