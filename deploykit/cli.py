"""``python -m deploykit``: check an inventory, show a host's relay config, make DKIM keys.

python -m deploykit check INVENTORY          # validate; print each host's role
python -m deploykit render INVENTORY HOST    # the relay config HOST gets
python -m deploykit dkim-keys INVENTORY      # make missing DKIM keys, write dns-records.txt
python -m deploykit dns-records INVENTORY    # print the DKIM TXT records to publish
python -m deploykit dns-check INVENTORY      # look the fleet's records up; print what is missing
python -m deploykit trace INVENTORY ...      # follow a message across the fleet (SSH)
python -m deploykit tenant INVENTORY suspend NAME --reason R
                                             # a customer on every good gateway (SSH): list,
                                             # show, suspend, resume
"""

from __future__ import annotations

import argparse
import json
import sys

from deploykit import dnscheck
from deploykit import tenant as fleet_tenant
from deploykit.dkim_keys import dns_records, make_dkim_keys
from deploykit.fleet import Fleet
from deploykit.host import Gateway
from deploykit.inventory import load_inventory, print_warnings
from deploykit.problems import InventoryError
from deploykit.trace import trace as fleet_trace
from gateway.cli.trace import add_criteria, criteria_of, time_spec
from gateway.trace import render


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploykit", description="the Secure Mail Gateway deploy's inventory tools"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate an inventory; print each host's role")
    check.add_argument("inventory")
    render = sub.add_parser("render", help="print the relay config a host gets")
    render.add_argument("inventory")
    render.add_argument("host")
    keys = sub.add_parser("dkim-keys", help="make missing DKIM keys, write dns-records.txt")
    keys.add_argument("inventory")
    records = sub.add_parser("dns-records", help="print the DKIM TXT records to publish")
    records.add_argument("inventory")
    dns_check = sub.add_parser(
        "dns-check", help="look up DKIM, SPF, PTR records; print what is missing (exit 3)"
    )
    dns_check.add_argument("inventory")
    dns_check.add_argument(
        "--nameserver", action="append", metavar="IP[:PORT]",
        help="ask this server (default: the inventory's resolvers, else the system's)",
    )  # fmt: skip
    tenant = sub.add_parser(
        "tenant", help="a customer on every good gateway: list, show, suspend, resume (SSH)"
    )
    tenant.add_argument("inventory")
    tenant.add_argument("action", choices=fleet_tenant.ACTIONS)
    tenant.add_argument("name", nargs="?", metavar="NAME", help="the customer (not for list)")
    tenant.add_argument("--reason", help="why (suspend, resume: each host's audit log)")
    tenant.add_argument("--json", action="store_true", help="each host's answer as JSON")
    trace = sub.add_parser("trace", help="follow a message across the fleet (over SSH)")
    trace.add_argument("inventory")
    add_criteria(trace)
    trace.add_argument("--json", action="store_true", help="the path as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dkim-keys":
            make_dkim_keys(load_inventory(args.inventory, check_keys=False))
            load_inventory(args.inventory)  # now every key must be there
            return 0
        fleet = load_inventory(args.inventory)
    except InventoryError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    print_warnings(fleet)
    if args.command == "render":
        print(fleet.relay_toml(args.host), end="")
    elif args.command == "dns-check":
        findings = dnscheck.check(fleet, dnscheck.lookup_for(fleet, args.nameserver))
        print(dnscheck.report(findings), end="")
        return 0 if all(f.ok for f in findings) else 3
    elif args.command == "trace":
        return _trace(fleet, args)
    elif args.command == "tenant":
        return _tenant(fleet, args)
    elif args.command == "dns-records":
        for text in dns_records(fleet).values():
            print(text, end="")
    else:
        for gateway in fleet:
            print(f"{gateway.name:16} {gateway.role:4} {_addresses(gateway):40} {gateway.fqdn}")
        print(f"{fleet.inventory_file}: valid ({len(fleet.gateways)} hosts)")
    return 0


def _tenant(fleet: Fleet, args: argparse.Namespace) -> int:
    try:
        answers = fleet_tenant.on_fleet(fleet, args.action, args.name, args.reason, args.json)
    except ValueError as exc:
        print(f"tenant: {exc}", file=sys.stderr)
        return 2
    print(fleet_tenant.render(answers, args.json), end="")
    return 0 if all(a.ok for a in answers) else 1


def _trace(fleet: Fleet, args: argparse.Namespace) -> int:
    criteria = criteria_of(args)
    if criteria.empty():
        print("trace: give --message-id, --queue-id, --sender or --recipient", file=sys.stderr)
        return 2
    try:
        since, until = time_spec(args.since), time_spec(args.until)
    except ValueError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 2
    result = fleet_trace(fleet, criteria, since, until)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=True))
    else:
        print(render(result), end="")
        for error in result["errors"]:
            print(f"warning: could not ask {error}", file=sys.stderr)
    return 1 if result["errors"] and not result["messages"] else 0


def _addresses(gateway: Gateway) -> str:
    """``public`` or, behind NAT, ``public (listen listen[, source source])``."""
    private = [("listen", gateway.listen_address), ("source", gateway.source_address)]
    shown = [f"{what} {a}" for what, a in private if a != gateway.public_address]
    return f"{gateway.public_address} ({', '.join(shown)})" if shown else gateway.public_address
