"""``smg dkim keygen`` and ``smg dkim dns-record``: DKIM keys for a domain, and their TXT record.

``keygen`` writes ``DIR/<domain>/<selector>.key`` (PEM, mode 0600, never overwriting an existing
file) and prints the DNS record to publish and the ``[[dkim.keys]]`` entry for the relay's
configuration.  ``dns-record`` prints the record of an existing key again.
Exit status: 0 done, 1 a bad argument or an unusable/existing key file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.config import ConfigError, parse_domain
from gateway.dkim import DkimKeyError, dns_record_value, load_private_key, write_new_key, zone_line


def register(subparsers: argparse._SubParsersAction) -> None:
    dkim = subparsers.add_parser("dkim", help="DKIM keys and their DNS records")
    commands = dkim.add_subparsers(dest="dkim_command", metavar="COMMAND", required=True)

    keygen = commands.add_parser("keygen", help="generate a signing key (0600) for a domain")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", required=True, type=Path, help="key directory")
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(handler=cmd_keygen)

    record = commands.add_parser("dns-record", help="print the TXT record of an existing key")
    record.add_argument("keyfile", type=Path)
    record.add_argument("--domain", required=True)
    record.add_argument("--selector", required=True)
    record.add_argument("--json", action="store_true", help="machine-readable output")
    record.set_defaults(handler=cmd_dns_record)


def _names(args: argparse.Namespace) -> tuple[str, str] | None:
    try:
        domain = parse_domain(args.domain)
    except (ValueError, ConfigError) as exc:
        print(f"smg dkim: --domain: {exc}", file=sys.stderr)
        return None
    selector = args.selector
    if not selector or not all(c.isalnum() or c in "._-" for c in selector):
        print(f"smg dkim: --selector: invalid selector {selector!r}", file=sys.stderr)
        return None
    return domain, selector


def _print_record(
    args: argparse.Namespace, domain: str, selector: str, value: str, key_path: Path
) -> None:
    name = f"{selector}._domainkey.{domain}"
    if args.json:
        print(json.dumps({"name": name, "type": "TXT", "value": value, "key": str(key_path)}))
        return
    print(f"name:  {name}")
    print("type:  TXT")
    print(f"value: {value}")
    print(f"zone:  {zone_line(name, value)}")


def cmd_keygen(args: argparse.Namespace) -> int:
    names = _names(args)
    if names is None:
        return 1
    domain, selector = names
    if args.algorithm == "rsa" and not 1024 <= args.bits <= 8192:
        print("smg dkim: --bits must be between 1024 and 8192", file=sys.stderr)
        return 1
    try:
        path, value = write_new_key(args.out, domain, selector, args.algorithm, args.bits)
    except (DkimKeyError, OSError) as exc:
        print(f"smg dkim: {exc}", file=sys.stderr)
        return 1
    _print_record(args, domain, selector, value, path)
    if not args.json:
        print()
        print("# configuration entry (smg.toml):")
        print("[[dkim.keys]]")
        print(f'domain = "{domain}"')
        print(f'selector = "{selector}"')
        print(f'key = "{path.resolve()}"')
    return 0


def cmd_dns_record(args: argparse.Namespace) -> int:
    names = _names(args)
    if names is None:
        return 1
    try:
        key = load_private_key(args.keyfile)
    except (DkimKeyError, OSError) as exc:
        print(f"smg dkim: {exc}", file=sys.stderr)
        return 1
    _print_record(args, names[0], names[1], dns_record_value(key), args.keyfile)
    return 0
