"""``smg tls report``: the RFC 8460 TLS reports from the relay's counts; ``--send`` mails them.

    smg tls report --config FILE [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--send]

Default: yesterday (UTC).  Without ``--send`` the reports are printed as one JSON object
(``{domain: report}``).  With it each domain that publishes ``_smtp._tls`` ``v=TLSRPTv1;
rua=mailto:...`` gets its report mailed through the relay's own listener (it leaves like any
mail); the others are skipped.  Exit 0, 1 if a report could not be sent, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import smtplib
import sys
from typing import Any

from gateway.config import ConfigError, load_config
from gateway.dns import Resolver
from gateway.queue.spool import resolve_path
from gateway.tls.tlsrpt import STATE_FILE, TlsRptCounts, build_reports, parse_rua, report_mail


def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date YYYY-MM-DD: {text!r}") from None


def run_report(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    since, until = args.since or yesterday, args.until or args.since or yesterday
    state = resolve_path(config.gateway.spool).parent / STATE_FILE
    counts = TlsRptCounts(state)
    host = config.gateway.hostname
    reports = build_reports(counts.rows(since, until), since, until, host, f"postmaster@{host}")
    if not args.send:
        print(json.dumps(reports, indent=2))
        return 0
    return asyncio.run(_send(config, reports))


async def _send(config: Any, reports: dict[str, dict[str, Any]]) -> int:
    resolver = Resolver(config.dns)
    host = config.gateway.hostname
    failed = 0
    for domain, report in reports.items():
        txt = await resolver.query(f"_smtp._tls.{domain}", "TXT")
        addresses = parse_rua(["".join(_strings(r)) for r in txt.records] if txt.ok else [])
        if not addresses:
            print(f"{domain}: no v=TLSRPTv1 mailto rua: not sent")
            continue
        listen_host, listen_port = config.gateway.listen[-1]
        for rua in addresses:
            data = report_mail(report, f"tlsrpt@{host}", rua, host)
            try:
                with smtplib.SMTP(listen_host, listen_port, host, timeout=30) as smtp:
                    smtp.sendmail(f"tlsrpt@{host}", [rua], data)
                print(f"{domain}: report {report['report-id']} sent to {rua}")
            except (OSError, smtplib.SMTPException) as exc:
                failed += 1
                print(f"{domain}: report to {rua} failed: {exc}", file=sys.stderr)
    return 1 if failed else 0


def _strings(record: Any) -> list[str]:
    return [s.decode("utf-8", "replace") for s in record.strings]


def register(tls_commands: Any) -> None:
    report = tls_commands.add_parser(
        "report", help="RFC 8460 TLS reports (print, or mail to the domains' rua)"
    )
    report.add_argument("--config", metavar="FILE", required=True, help="relay config")
    report.add_argument("--since", type=_day, help="first UTC day (default: yesterday)")
    report.add_argument("--until", type=_day, help="last UTC day (default: --since)")
    report.add_argument("--send", action="store_true", help="mail each to its domain's rua")
    report.set_defaults(handler=run_report)
