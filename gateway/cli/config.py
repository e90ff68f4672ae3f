"""``smg config validate FILE``: exit 0, or 1 listing every error (file: key: what).

Warnings (allowed, but probably not meant: a forced-TLS rule that shadows MTA-STS) are listed
on stderr as ``file: key: warning: what`` and the exit status stays 0."""

from __future__ import annotations

import argparse
import sys

from gateway.config import ConfigError, config_warnings, load_config, render_warning


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="check configuration files")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = actions.add_parser("validate", help="validate a TOML file; list every error")
    validate.add_argument("file", metavar="FILE", help="the TOML file to check")
    validate.set_defaults(handler=cmd_config_validate)


def cmd_config_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.file}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    warnings = config_warnings(config)
    for warning in warnings:
        print(render_warning(args.file, warning), file=sys.stderr)
    count = len(warnings)
    print(f"{args.file}: OK" + (f" ({count} warning{'s' if count != 1 else ''})" if count else ""))
    return 0
