"""``smg blacklist check|status``: the DNSBL monitor (see docs/blacklist.md).

``check`` is a Nagios plugin: exit 0 clean, 1 listed on a minor list, 2 listed on a major
list, 3 unknown, also for its own errors (bad config, bad arguments, state locked), so a
monitoring system never reads a crash as "listed".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from gateway.blacklist import textfile
from gateway.blacklist.check import UNKNOWN_EXIT, CheckError, run_check, utc_now
from gateway.blacklist.fallback import LeaderNotifies, first_up
from gateway.blacklist.report import check_json, check_text, delivery_warnings, status_text
from gateway.blacklist.state import StateError, Store, iso, status_snapshot
from gateway.config import ConfigError, load_config, parse_host_port


class _NagiosParser(argparse.ArgumentParser):
    """Usage errors exit 3 (UNKNOWN), not argparse's 2 (which would read as CRITICAL)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(UNKNOWN_EXIT, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "blacklist", help="check the fleet's addresses against DNS blacklists"
    )
    commands = parser.add_subparsers(
        dest="blacklist_command", metavar="COMMAND", required=True, parser_class=_NagiosParser
    )
    check = commands.add_parser(
        "check",
        help="ask every DNSBL about every address; notify; exit 0/1/2/3 (Nagios)",
        description="Exit codes: 0 clean, 1 listed on a minor list, 2 listed on a major list, "
        "3 unknown (a list did not answer usefully, or the check itself failed).",
    )
    check.add_argument("--config", required=True, help="the relay's TOML config")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.add_argument(
        "--textfile", type=Path, help="also write the state for node exporter to this .prom file"
    )
    check.add_argument(
        "--defer-to", action="append", default=[], metavar="HOST:PORT",
        help="fallback monitor: notify only if none of these (the hosts ranked before this "
        "one, their relays) answers; else record without sending (docs/blacklist.md)",
    )  # fmt: skip
    check.add_argument(
        "--defer-wait", type=float, default=0.0, metavar="SECONDS",
        help="with --defer-to: wait this long first (the leader's head start, at most 3600)",
    )  # fmt: skip
    check.set_defaults(handler=_check)
    status = commands.add_parser(
        "status", help="open listings and removal requests, undelivered notices, history"
    )
    status.add_argument("--config", required=True, help="the relay's TOML config")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument("--history", type=int, default=20, help="closed listings shown")
    status.add_argument("--checks", type=int, default=10, help="last checks shown")
    status.set_defaults(handler=_status)


def _textfile(args: argparse.Namespace, results: list, code: int) -> None:
    if args.textfile is None:
        return
    try:
        textfile.write(args.textfile, textfile.render(results, code))
    except OSError as exc:  # the check itself did its job: say so, do not change the exit code
        print(f"cannot write {args.textfile}: {exc}", file=sys.stderr)


def _fallback_notifier(args: argparse.Namespace, config: Any) -> LeaderNotifies | None:
    """As a fallback monitor: wait the leader's head start, then ask whether it is up."""
    if not args.defer_to:
        return None
    leaders = [parse_host_port(value, default_port=25) for value in args.defer_to]
    time.sleep(min(max(args.defer_wait, 0.0), 3600.0))
    leader = asyncio.run(first_up(leaders))
    if leader is None:
        print(f"fallback monitor: {', '.join(args.defer_to)} down: notifying", file=sys.stderr)
        return None
    print(f"fallback monitor: {leader} is up and notifies: recording only", file=sys.stderr)
    return LeaderNotifies(leader, config.blacklist.ticket_id_field)


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        notifier = _fallback_notifier(args, config)
        report = asyncio.run(run_check(config, notifier=notifier))
    except (ConfigError, CheckError, StateError) as exc:
        print(f"BLACKLIST UNKNOWN - {exc}", file=sys.stdout)
        _textfile(args, [], UNKNOWN_EXIT)
        return UNKNOWN_EXIT
    except Exception:  # a bug must not read as "listed" to the monitoring
        print("BLACKLIST UNKNOWN - internal error, see stderr")
        traceback.print_exc()
        _textfile(args, [], UNKNOWN_EXIT)
        return UNKNOWN_EXIT
    _textfile(args, report.results, report.exit_code)
    if args.json:
        print(json.dumps(check_json(report), indent=2))
    else:
        print(check_text(report))
    for warning in delivery_warnings(report):
        print(warning, file=sys.stderr)
    return report.exit_code


def _status(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    path = config.blacklist.state
    if not path.exists():
        print(f"no check has run yet ({path} does not exist)")
        return 0
    try:
        store = Store(path)
    except StateError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        snapshot = status_snapshot(store, args.history, args.checks)
    finally:
        store.close()
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(status_text(snapshot, iso(utc_now())))
    return 0
