"""``smg trace``: find a message in this host's relay log and show its path (docs/monitoring.md).

    smg trace --message-id '<id@example>' [--since 1d] [--until now] [--json | --records]
    smg trace --queue-id ID [--queue-id ID2 ...] | --sender ADDR | --recipient ADDR

Reads ``journalctl -u smg.service -o cat`` within ``--since``/``--until`` (or ``--file``, a log
file in either format).  ``--records`` prints the matching records as JSON lines: what
``python -m deploykit trace`` collects from every host of the fleet over SSH to follow a message
from hop to hop.  Reading the journal needs root or the systemd-journal group.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from gateway.trace import Criteria, paths, render, search

JOURNAL_UNIT = "smg.service"
# journalctl time specs: "2026-12-05 03:00", "-2h", "1 day ago", "today", "now"; a bare
# duration ("2h", "1d") means that long ago.
_TIME = re.compile(r"[0-9A-Za-z :.+-]{1,40}")
_DURATION = re.compile(r"\d+\s*(s|sec|min|m|h|d|w)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="find a message in the relay's log, show its path")
    add_criteria(parser)
    parser.add_argument("--unit", default=JOURNAL_UNIT, help="the relay's systemd unit")
    parser.add_argument("--file", type=Path, help="read this log file instead of the journal")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the path as JSON")
    out.add_argument("--records", action="store_true", help="matching records as JSON lines")
    parser.set_defaults(handler=_trace)


def add_criteria(parser: argparse.ArgumentParser) -> None:
    """The search options (shared with ``python -m deploykit trace``)."""
    parser.add_argument("--message-id", help="the Message-ID header, with its <>")
    parser.add_argument("--queue-id", action="append", default=[], help="a queue id (any hop)")
    parser.add_argument("--sender", help="envelope sender address")
    parser.add_argument("--recipient", help="envelope recipient address")
    parser.add_argument("--since", default="1d", help="journalctl --since, or a duration (1d)")
    parser.add_argument("--until", default=None, help="journalctl --until (default: now)")


def criteria_of(args: argparse.Namespace) -> Criteria:
    return Criteria(args.message_id, frozenset(args.queue_id), args.sender, args.recipient)


def time_spec(value: str | None) -> str | None:
    """A journalctl time, a bare duration as that long ago; ValueError for anything else."""
    if value is None:
        return None
    value = value.strip()
    if not _TIME.fullmatch(value):
        raise ValueError(f"not a time: {value!r} (e.g. 2h, 1d, '2026-12-05 03:00')")
    return f"-{value.replace(' ', '')}" if _DURATION.fullmatch(value) else value


def _journal(unit: str, since: str | None, until: str | None) -> Iterator[str]:
    command = ["journalctl", "-u", unit, "-o", "cat", "--no-pager"]
    command += [f"--since={since}"] if since else []
    command += [f"--until={until}"] if until else []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        yield from proc.stdout
    if proc.returncode not in (0, None):
        raise OSError(f"journalctl exited {proc.returncode} (root or systemd-journal needed)")


def _trace(args: argparse.Namespace) -> int:
    criteria = criteria_of(args)
    if criteria.empty():
        print("smg trace: give --message-id, --queue-id, --sender or --recipient", file=sys.stderr)
        return 2
    try:
        since, until = time_spec(args.since), time_spec(args.until)
        if args.file is not None:
            with args.file.open(errors="replace") as handle:
                records = list(search(handle, criteria))
        else:
            records = list(search(_journal(args.unit, since, until), criteria))
    except (OSError, ValueError) as exc:
        print(f"smg trace: {exc}", file=sys.stderr)
        return 1
    if args.records:
        for record in records:
            print(json.dumps(record, ensure_ascii=True))
    elif args.json:
        print(json.dumps(paths(records), indent=2, ensure_ascii=True))
    else:
        print(render(paths(records)), end="")
    return 0
