"""``smg``: the operator's command line.

Each feature keeps its sub-commands in its own module (``gateway/cli_*.py``) with a
``register(subparsers)`` function; this file only assembles them.  A command handler takes the
parsed arguments and returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands.  A module that is not there yet is skipped, so features
# land independently.
COMMAND_MODULES = [
    "gateway.cli_core",  # serve, config validate, check-sender
    "gateway.cli_queue",  # queue list|show|flush|hold|release|delete
    "gateway.cli_explain",  # explain
    "gateway.cli_dkim",  # dkim keygen|dns-record
    "gateway.cli_tls",  # tls probe
    "gateway.cli_blacklist",  # blacklist check|status
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smg", description="Secure Mail Gateway relay")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
