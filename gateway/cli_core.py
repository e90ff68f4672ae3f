"""The relay's own commands: ``smg serve``, ``smg config validate``, ``smg check-sender``.

smg serve --config FILE                 run the relay (exit 78 on a bad config)
smg config validate FILE                exit 0, or 1 listing every error (file: key: what)
smg check-sender DOMAIN --config FILE   the sender domain verdict the relay would give:
                                        exit 0 accept, 1 reject (550), 2 tempfail (451),
                                        3 the config could not be loaded
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from gateway.config import Config, ConfigError, load_config
from gateway.dns import Resolver
from gateway.policy.rules.sender_domain import SenderVerdict, check_sender_domain

DEFAULT_CONFIG = "/etc/smg/smg.toml"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the relay (SMTP intake, delivery, metrics)")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="the relay's TOML file")
    serve.set_defaults(handler=cmd_serve)

    config = subparsers.add_parser("config", help="check configuration files")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = actions.add_parser("validate", help="validate a TOML file; list every error")
    validate.add_argument("file", metavar="FILE", help="the TOML file to check")
    validate.set_defaults(handler=cmd_config_validate)

    check = subparsers.add_parser(
        "check-sender", help="would the sender domain check accept DOMAIN (or an address)?"
    )
    check.add_argument("domain", metavar="DOMAIN", help="a domain, or an address user@domain")
    check.add_argument("--config", default=DEFAULT_CONFIG, help="the relay's TOML file")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_check_sender)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve
    from gateway.workers import run_event_loop, supervise

    def one() -> int:
        return run_event_loop(lambda: serve(args.config))

    try:
        gateway = load_config(args.config).gateway
    except ConfigError:
        return one()  # serve() reports the errors and exits 78
    return supervise(gateway.workers, one, gateway.log_format) if gateway.workers > 1 else one()


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
        print(f"{verdict.domain}: accept ({verdict.summary})")
    else:
        print(f"{verdict.domain}: {action}: {verdict.reply}")
    return verdict.exit_code


async def _check(config: Config, target: str) -> SenderVerdict:
    domain = target.strip().strip("<>").rpartition("@")[2]
    if not domain:
        return SenderVerdict("<>", None, None, "the null sender <> is always accepted")
    return await check_sender_domain(Resolver(config.dns), domain)
