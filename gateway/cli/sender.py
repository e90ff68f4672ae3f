"""``smg check-sender DOMAIN --config FILE``: the sender domain verdict the relay would give.

Exit 0 accept, 1 reject (550), 2 tempfail (451), 3 the config could not be loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from gateway.cli.serve import DEFAULT_CONFIG
from gateway.config import Config, ConfigError, load_config
from gateway.dns import Resolver
from gateway.log import printable
from gateway.policy.rules.sender_domain import SenderVerdict, check_sender_domain


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check-sender", help="would the sender domain check accept DOMAIN (or an address)?"
    )
    check.add_argument("domain", metavar="DOMAIN", help="a domain, or an address user@domain")
    check.add_argument("--config", default=DEFAULT_CONFIG, help="the relay's TOML file")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_check_sender)


def cmd_check_sender(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 3
    verdict = asyncio.run(_check(config, args.domain))
    action = {0: "accept", 1: "reject", 2: "tempfail"}[verdict.exit_code]
    if args.json:
        reply = str(verdict.reply) if verdict.reply else "250 2.1.0 Sender ok"
        data = {"domain": verdict.domain, "verdict": action, "reply": reply,
                "summary": verdict.summary, "details": verdict.details}  # fmt: skip
        print(json.dumps(data, indent=2, default=str))
    elif verdict.reply is None:
        print(printable(f"{verdict.domain}: accept ({verdict.summary})"))
    else:
        print(printable(f"{verdict.domain}: {action}: {verdict.reply}"))
    return verdict.exit_code


async def _check(config: Config, target: str) -> SenderVerdict:
    domain = target.strip().strip("<>").rpartition("@")[2]
    if not domain:
        return SenderVerdict("<>", None, None, "the null sender <> is always accepted")
    return await check_sender_domain(Resolver(config.dns), domain)
