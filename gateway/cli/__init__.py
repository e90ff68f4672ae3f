"""``smg``: the operator's command line.

One module per command group, each with a ``register(subparsers)`` function; this package
only assembles them.  A command handler takes the parsed arguments and returns the process
exit code.
"""

from __future__ import annotations

import argparse

from gateway.cli import blacklist, config, dkim, explain, queue, sender, serve, tenant, tls, trace

# In the order ``smg --help`` lists them.
COMMAND_GROUPS = [
    serve,  # serve
    config,  # config validate
    sender,  # check-sender
    queue,  # queue list|show|flush|hold|release|delete
    explain,  # explain
    dkim,  # dkim keygen|dns-record
    tls,  # tls probe
    blacklist,  # blacklist check|status
    tenant,  # tenant list|show|suspend|resume|hash-password
    trace,  # trace (message tracking)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smg", description="Secure Mail Gateway relay")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)
