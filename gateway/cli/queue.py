"""``smg queue``: look at and act on the queue, like postqueue and postsuper.

Works on the spool database of ``gateway.spool`` directly, also while the relay runs: reads
never block the relay, and each change is one short transaction.  The relay polls the spool every
``delivery.scan_interval``, so a flush or a release takes effect within that time; a hold or a
delete made during a delivery attempt wins over the attempt's result.

    smg queue list [--json] [--limit N] [--after ID] [--destination DOMAIN]
                                queued messages with their recipients and last reply, oldest
                                first, read a page at a time (never all in memory)
    smg queue show ID [--body]  one message: envelope, states, facts, headers (or whole message)
    smg queue flush [--destination DOMAIN]
                                every deferred message (of DOMAIN) is due now (held ones stay)
    smg queue hold ID           keep ID in the queue until released
    smg queue release ID        make a held ID due now
    smg queue delete ID         remove ID from the queue (no NDR)
    smg queue check             SQLite's integrity check of the spool (prints "ok")
    smg queue backup FILE       a consistent copy of the spool, also while the relay writes

flush, hold, release and delete change state: each is logged in ``<spool>/audit.log`` and the
journal with the operator (``SUDO_USER``/``USER``) and ``--reason`` (``gateway.audit``); when
the audit log cannot be written the action is refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sqlite3
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.audit import AuditUnavailable, audited
from gateway.cli.serve import DEFAULT_CONFIG
from gateway.config import ConfigError, load_config
from gateway.log import printable
from gateway.queue.admin import SpoolAdmin
from gateway.queue.model import HoldReason, MessageKind, MessageState, QueuedMessage
from gateway.queue.spool import SpoolUnavailable, UnknownMessage
from gateway.queue.unpause import request_unpause


def register(subparsers: argparse._SubParsersAction) -> None:
    queue = subparsers.add_parser("queue", help="look at and act on the queue (like postqueue)")
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    def action(
        name: str, help_text: str, handler: Any, with_id: bool = False, changes: bool = False
    ) -> Any:
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("--config", default=DEFAULT_CONFIG, help="the relay's TOML file")
        if with_id:
            parser.add_argument("queue_id", metavar="ID", help="queue id (see smg queue list)")
        if changes:
            parser.add_argument("--reason", help="why (written to the audit log with your user)")
        parser.set_defaults(handler=handler)
        return parser

    listing = action("list", "queued messages, oldest first", _list)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--limit", type=_positive, help="at most N messages")
    listing.add_argument("--after", default="", metavar="ID", help="messages after this id")
    listing.add_argument("--destination", metavar="DOMAIN", help="only mail to this domain")
    show = action("show", "one message in detail", _show, with_id=True)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--body", action="store_true", help="print the whole message")
    flush = action("flush", "attempt every deferred message now", _flush, changes=True)
    flush.add_argument("--destination", metavar="DOMAIN", help="only mail to this domain")
    action("hold", "keep a message until released", _hold, with_id=True, changes=True)
    action("release", "make a held message due now", _release, with_id=True, changes=True)
    action("delete", "remove a message from the queue (no NDR)", _delete, with_id=True,
           changes=True)  # fmt: skip
    action("check", "SQLite's integrity check of the spool database", _check)
    backup = action("backup", "copy the spool database consistently to FILE", _backup)
    backup.add_argument("file", metavar="FILE", help="where the copy goes (must not exist)")


# --- plumbing ---------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--limit must be a whole number >= 1, not {text!r}")
    return value


def _fail(message: str) -> int:
    print(f"smg queue: {message}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace, body: Any, audit: str | None = None) -> int:
    """Open the spool named by ``--config`` and run ``body(admin)`` with clear errors; an
    ``audit`` action name makes it an audited change (refused when it cannot be logged)."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(exc.render())
    try:
        with SpoolAdmin(config.gateway.spool) as admin:
            if audit is None:
                return int(body(admin) or 0)
            target = getattr(args, "queue_id", None) or getattr(args, "destination", None) or "*"
            with audited(config.gateway.spool, audit, target, args.reason) as extra:
                code = int(body(admin) or 0)
                if code:
                    extra["result"] = "refused"
                return code
    except UnknownMessage as exc:
        return _fail(str(exc))
    except (SpoolUnavailable, AuditUnavailable) as exc:
        return _fail(str(exc))


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _to_json(message: QueuedMessage, with_data: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": message.id,
        "kind": message.kind,
        "sender": message.sender,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "last_reply": r.last_reply,
                "remote_mta": r.remote_mta,
            }
            for r in message.recipients
        ],
        "route": message.route,
        "state": message.state,
        "hold_reason": message.hold_reason,
        "size": message.size_on_disk,
        "created_at": _iso(message.created_at),
        "next_attempt": _iso(message.next_attempt),
        "attempts": message.attempts,
        "last_attempt": _iso(message.last_attempt),
        "client_ip": message.client_ip,
        "helo": message.helo,
        "facts": message.facts,
    }
    if with_data:
        out["data"] = message.data.decode("utf-8", "replace")
    return out


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def _state_text(message: QueuedMessage) -> str:
    if message.state == MessageState.HELD:
        return f"held ({message.hold_reason or HoldReason.OPERATOR})"
    if message.state == MessageState.DEFERRED:
        return f"deferred until {_when(message.next_attempt)}"
    return MessageState.ACTIVE


# --- the actions ------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    def body(admin: SpoolAdmin) -> int:
        destination = args.destination.lower() if args.destination else None
        messages = admin.pages(args.after, args.limit, destination)
        if args.json:
            _print_json_stream(messages)
            return 0
        count = total = 0
        for m in messages:
            if count == 0:
                print(f"{'Queue ID':<14} {'Size':>8}  {'Arrival':<25} {'State':<10} Sender")
            _print_entry(m)
            count, total = count + 1, total + m.size_on_disk
        if count == 0:
            print("Mail queue is empty" if not (args.after or destination) else "No messages")
            return 0
        if args.limit or args.after or destination:
            print(f"-- {total // 1024 or 1} KiB in {count} message(s) listed")
            return 0
        states = ", ".join(f"{n} {s}" for s, n in admin.counts().items() if n)
        print(f"-- {total // 1024 or 1} KiB in {count} message(s): {states}")
        return 0

    return _run(args, body)


def _print_json_stream(messages: Iterable[QueuedMessage]) -> None:
    """A JSON array written element by element (a million messages never in memory at once)."""
    out = sys.stdout
    out.write("[")
    for i, m in enumerate(messages):
        text = json.dumps(_to_json(m), indent=2, default=str)
        out.write(("," if i else "") + "\n" + textwrap.indent(text, "  "))
    out.write("\n]\n")


def _print_entry(m: QueuedMessage) -> None:
    sender = printable(m.sender) or ("<> (NDR)" if m.kind == MessageKind.NDR else "<>")
    print(f"{m.id:<14} {m.size_on_disk:>8}  {_when(m.created_at):<25} {m.state:<10} {sender}")
    if m.state in (MessageState.HELD, MessageState.DEFERRED):
        print(f"{'':<16}{_state_text(m)}, {m.attempts} attempt(s)")
    for r in m.recipients:
        reply = f"  ({printable(r.last_reply)})" if r.last_reply else ""
        print(f"{'':<16}{printable(r.address)}  [{r.status}]{reply}")
    print()


def _show(args: argparse.Namespace) -> int:
    def body(admin: SpoolAdmin) -> int:
        m = admin.show(args.queue_id)
        if args.json:
            print(json.dumps(_to_json(m, with_data=args.body), indent=2, default=str))
            return 0
        lines = [
            f"Queue ID:     {m.id} ({m.kind})",
            f"Sender:       <{printable(m.sender)}>",
            f"State:        {_state_text(m)}",
            f"Route:        {m.route}",
            f"Arrival:      {_when(m.created_at)}",
            f"Attempts:     {m.attempts} (last {_when(m.last_attempt)})",
            f"Size:         {m.size_on_disk} bytes",
            f"Client:       {printable(m.client_ip or '-')} (HELO {printable(m.helo or '-')})",
            "Recipients:",
        ]
        for r in m.recipients:
            mta = f" via {printable(r.remote_mta)}" if r.remote_mta else ""
            lines.append(f"  {printable(r.address)}  [{r.status}]{mta}")
            if r.last_reply:
                lines.append(f"      last reply: {printable(r.last_reply)}")
        if m.facts:  # JSON with ASCII escapes: nothing in it reaches the terminal raw
            lines.append("Facts:")
            lines += [f"  {line}" for line in json.dumps(m.facts, indent=2).splitlines()]
        if args.body:
            lines += ["", "--- message ---", *_message_lines(m.data)]
        else:
            lines += ["", "--- headers (use --body for the whole message) ---"]
            lines += _message_lines(m.data, headers_only=True)
        print("\n".join(lines))
        return 0

    return _run(args, body)


def _message_lines(data: bytes, headers_only: bool = False) -> list[str]:
    """The stored message as lines for a terminal: control characters escaped (a folded
    header's tab kept), bytes that are not UTF-8 shown as U+FFFD."""
    lines = re.split("\r?\n", data.decode("utf-8", "replace"))
    if headers_only and "" in lines:
        lines = lines[: lines.index("")]
    return [printable(line, keep="\t") for line in lines]


def _flush(args: argparse.Namespace) -> int:
    if args.destination and any(c.isspace() for c in args.destination):
        return _fail(f"--destination: not a domain: {printable(args.destination)}")

    def body(admin: SpoolAdmin) -> int:
        if args.destination:
            changed = admin.flush_destination(args.destination)
            what = f"{changed} deferred message(s) to {printable(args.destination.lower())}"
        else:
            changed = admin.flush()
            what = f"{changed} deferred message(s)"
        try:
            request_unpause(admin.path.parent, args.destination)
        except OSError as exc:
            print(f"{what} due now, but the relay's pauses could not be ended ({exc}): they"
                  " end by themselves (docs/queue.md)", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{what} due now and {'its' if args.destination else 'every'} pause ended; the"
              " relay picks them up within its scan")  # fmt: skip
        return 0

    return _run(args, body, audit="queue.flush")


def _hold(args: argparse.Namespace) -> int:
    def body(admin: SpoolAdmin) -> int:
        admin.hold(args.queue_id)
        print(f"{args.queue_id}: held")
        return 0

    return _run(args, body, audit="queue.hold")


def _release(args: argparse.Namespace) -> int:
    def body(admin: SpoolAdmin) -> int:
        state = admin.show(args.queue_id).state
        if not admin.release(args.queue_id):
            return _fail(f"{args.queue_id} is not held (it is {state})")
        print(f"{args.queue_id}: released, due now")
        return 0

    return _run(args, body, audit="queue.release")


def _check(args: argparse.Namespace) -> int:
    def body(admin: SpoolAdmin) -> int:
        problems = [row[0] for row in admin.conn.execute("PRAGMA integrity_check")]
        print("\n".join(problems))
        return 0 if problems == ["ok"] else 1

    return _run(args, body)


def _backup(args: argparse.Namespace) -> int:
    target = Path(args.file)
    if target.exists():
        return _fail(f"{target} exists; give a new file name")

    def body(admin: SpoolAdmin) -> int:
        copy = sqlite3.connect(target)
        try:
            admin.conn.backup(copy)  # page by page, a consistent snapshot
        finally:
            copy.close()
        print(f"{admin.path} copied to {target} ({target.stat().st_size} bytes)")
        return 0

    return _run(args, body)


def _delete(args: argparse.Namespace) -> int:
    def body(admin: SpoolAdmin) -> int:
        admin.delete(args.queue_id)
        print(f"{args.queue_id}: deleted")
        return 0

    return _run(args, body, audit="queue.delete")
