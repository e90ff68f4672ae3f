"""``smg config validate FILE``: exit 0, or 1 listing every error (file: key: what)."""

from __future__ import annotations

import argparse
import sys

from gateway.config import ConfigError, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="check configuration files")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = actions.add_parser("validate", help="validate a TOML file; list every error")
    validate.add_argument("file", metavar="FILE", help="the TOML file to check")
    validate.set_defaults(handler=cmd_config_validate)


def cmd_config_validate(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.file}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    return 0
