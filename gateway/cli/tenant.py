"""``smg tenant list | show NAME | suspend NAME | resume NAME | hash-password``: the customers.

``list`` and ``show`` read the config's ``[[tenants]]`` and the state the workers share
(``<spool>/tenants.sqlite``: suspension, sessions, the last hour's usage, the verdict window).
``suspend`` and ``resume`` change that state for every worker of the running relay at once (the
next MAIL of the customer sees it) and survive a restart; both need ``--reason`` and are logged
in ``<spool>/audit.log`` (``gateway.audit``: refused when it cannot be written).  ``resume``
restarts the verdict window, so the old verdicts do not suspend the customer again.
``hash-password`` reads a password (prompt, or stdin when not a terminal) and prints the
``$scrypt$`` hash for ``[[tenants]] auth``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from gateway.audit import AuditUnavailable, audited
from gateway.cli.serve import DEFAULT_CONFIG
from gateway.config import ConfigError, load_config
from gateway.log import printable
from gateway.passwords import hash_password
from gateway.tenants import TenantTable
from gateway.tenants.state import TenantState


def register(subparsers: argparse._SubParsersAction) -> None:
    tenant = subparsers.add_parser("tenant", help="customers: list, show, suspend, resume")
    actions = tenant.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    for name, helptext, takes_name, changes in (
        ("list", "every customer with its state", False, False),
        ("show", "one customer: limits, usage, window, state", True, False),
        ("suspend", "suspend a customer (new mail: 451 4.7.1)", True, True),
        ("resume", "lift a suspension and restart its verdict window", True, True),
    ):
        parser = actions.add_parser(name, help=helptext)
        parser.add_argument("--config", default=DEFAULT_CONFIG, help="the relay's TOML file")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        if takes_name:
            parser.add_argument("name", metavar="NAME")
        if changes:
            parser.add_argument("--reason", required=True, help="why (audit log)")
        parser.set_defaults(handler=cmd_tenant)
    hashing = actions.add_parser("hash-password", help="print the scrypt hash of a password")
    hashing.set_defaults(handler=cmd_hash_password)


def cmd_hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("smg tenant: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("smg tenant: an empty password cannot be used", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def _describe(table: TenantTable, state: TenantState, name: str) -> dict[str, Any]:
    tenant = table.get(name)
    assert tenant is not None
    status = state.status(name).status
    messages, recipients, _retry = state.last_hour(name)
    window = state.window(name, tenant.limits.suspend_window)
    return {
        "name": name,
        "suspended": status.suspended,
        "since": status.since,
        "reason": status.reason,
        "by": status.by,
        "sessions": state.sessions().get(name, 0),
        "last_hour": {"messages": messages, "recipients": recipients},
        "window": {"seen": window.seen, "spam": window.spam, "rejected": window.rejected},
        "networks": [str(n) for n in tenant.networks],
        "domains": list(tenant.domains),
        "users": sorted(tenant.users),
        "limits": {k: v for k, v in vars(tenant.limits).items()},
    }


def cmd_tenant(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 78
    table = TenantTable.from_config(config)
    name = getattr(args, "name", None)
    if name is not None and table.get(name) is None:
        print(f"smg tenant: no customer {printable(name)!r} in {args.config}", file=sys.stderr)
        return 1
    state = TenantState.in_spool(config.gateway.spool)
    try:
        if args.tenant_command in ("suspend", "resume"):
            return _change(args, config.gateway.spool, state, name)
        names = [name] if name else sorted(table.tenants)
        shown = [_describe(table, state, n) for n in names]
    finally:
        state.close()
    if args.json:
        print(json.dumps(shown if name is None else shown[0], indent=2))
        return 0
    for item in shown:
        what = (
            f"SUSPENDED since {item['since']:.0f} ({item['reason']})"
            if item["suspended"]
            else "active"
        )
        print(f"{item['name']:24} {what}; sessions {item['sessions']}; last hour "
              f"{item['last_hour']['messages']} messages, {item['last_hour']['recipients']} "
              f"recipients; window {item['window']['seen']} seen, {item['window']['spam']} spam, "
              f"{item['window']['rejected']} rejected")  # fmt: skip
        if name:
            print(json.dumps({k: item[k] for k in ("networks", "domains", "users", "limits")},
                             indent=2))  # fmt: skip
    return 0


def _change(args: argparse.Namespace, spool: Any, state: TenantState, name: str) -> int:
    action = args.tenant_command
    try:
        with audited(spool, f"tenant.{action}", name, args.reason) as extra:
            if action == "suspend":
                changed = state.suspend(name, args.reason, "operator")
            else:
                changed = state.resume(name, args.reason, "operator")
            if not changed:
                extra["result"] = "unchanged"
    except AuditUnavailable as exc:
        print(f"smg tenant: {exc}", file=sys.stderr)
        return 1
    word = "suspended" if action == "suspend" else "resumed"
    result = {"name": name, "action": action, "changed": changed}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name}: {word}" if changed else f"{name}: already {word}")
    return 0
