"""``smg serve --config FILE``: run the relay (exit 78 on a bad config)."""

from __future__ import annotations

import argparse

from gateway.config import ConfigError, load_config
from gateway.server import serve
from gateway.workers import run_event_loop, supervise

DEFAULT_CONFIG = "/etc/smg/smg.toml"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the relay (SMTP intake, delivery, metrics)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the relay's TOML file")
    parser.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    def one() -> int:
        return run_event_loop(lambda: serve(args.config))

    try:
        gateway = load_config(args.config).gateway
    except ConfigError:
        return one()  # serve() reports the errors and exits 78
    return supervise(gateway.workers, one, gateway.log_format) if gateway.workers > 1 else one()
