"""What ``smg blacklist check`` and ``status`` print: a Nagios line, tables, or JSON."""

from __future__ import annotations

from typing import Any

from gateway.blacklist.answers import CLEAN, LISTED, UNKNOWN
from gateway.blacklist.check import EXIT_NAMES, CheckReport
from gateway.blacklist.lookup import Result
from gateway.blacklist.messages import duration, list_label
from gateway.blacklist.state import iso
from gateway.log import printable

_STATUS_ORDER = {LISTED: 0, UNKNOWN: 1, CLEAN: 2}
_SHOWN_IN_SUMMARY = 3


def summary_line(report: CheckReport) -> str:
    """The first line, the one Nagios shows: state, what matters most, performance data."""
    listed = [r for r in report.results if r.status == LISTED]
    unknown = [r for r in report.results if r.status == UNKNOWN]
    if listed:
        major = [r for r in listed if r.major]
        shown = major or listed
        text = f"listed on a {'major' if major else 'minor'} list: " + _some(
            [f"{r.ip} on {r.list_name}" for r in shown]
        )
    elif unknown:
        text = f"no listing, {len(unknown)} unknown: " + _some(
            [f"{r.ip} on {r.zone} ({r.meaning})" for r in unknown]
        )
    else:
        addresses = len({r.ip for r in report.results})
        zones = len({r.zone for r in report.results})
        text = f"{addresses} addresses clean on {zones} lists"
    counts = report.counts
    perf = f"listed={counts[LISTED]} unknown={counts[UNKNOWN]} clean={counts[CLEAN]}"
    return f"BLACKLIST {EXIT_NAMES[report.exit_code]} - {text} | {perf}"


def _some(items: list[str]) -> str:
    more = len(items) - _SHOWN_IN_SUMMARY
    return ", ".join(items[:_SHOWN_IN_SUMMARY]) + (f" and {more} more" if more > 0 else "")


def _reason(result: Result) -> str:
    # The meaning and the TXT reason come from the list's DNS answers: escaped for a terminal.
    if result.status == LISTED:
        return printable(result.meaning + (f" - {result.reason}" if result.reason else ""))
    return printable(result.meaning)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def check_text(report: CheckReport) -> str:
    results = sorted(report.results, key=lambda r: (_STATUS_ORDER[r.status], r.ip, r.zone))
    rows = [
        [
            r.ip,
            r.zone + (" (major)" if r.major else ""),
            r.status,
            _reason(r) or "-",
            report.since.get((r.ip, r.zone), "-") if r.status != CLEAN else "-",
        ]
        for r in results
    ]
    out = [summary_line(report), table(rows, ["IP", "LIST", "STATUS", "REASON", "LISTED SINCE"])]
    if report.skipped:
        pairs = ", ".join(f"{ip} on {zone}" for ip, zone in report.skipped)
        out.append(f"not asked (the list has no IPv6 data): {pairs}")
    if report.changes.opened or report.changes.closed:
        out.append(
            f"new listings: {len(report.changes.opened)}, delisted: {len(report.changes.closed)}"
        )
    delivery = report.delivery
    if delivery.sent or delivery.failed:
        out.append(f"notifications: {len(delivery.sent)} sent, {len(delivery.failed)} failed")
    return "\n".join(out)


def delivery_warnings(report: CheckReport) -> list[str]:
    return [
        f"warning: {item['kind']} #{item['id']} (listing {item['listing_id']}) failed "
        f"({'retried at the next check' if item['state'] == 'pending' else 'gave up'}): "
        f"{printable(item['error'])}"
        for item in report.delivery.failed
    ]


def check_json(report: CheckReport) -> dict[str, Any]:
    return {
        "check_id": report.check_id,
        "started_at": iso(report.started_at),
        "finished_at": iso(report.finished_at),
        "exit_code": report.exit_code,
        "state": EXIT_NAMES[report.exit_code],
        "summary": summary_line(report),
        "counts": report.counts,
        "results": [
            {**r.as_dict(), "listed_since": report.since.get((r.ip, r.zone))}
            if r.status != CLEAN
            else r.as_dict()
            for r in report.results
        ],
        "not_asked": [{"ip": ip, "zone": zone} for ip, zone in report.skipped],
        "opened_listings": report.changes.opened,
        "closed_listings": report.changes.closed,
        "notifications": report.delivery.as_dict(),
    }


# --- status ---------------------------------------------------------------------------------


def status_text(status: dict[str, Any], now: str) -> str:
    out: list[str] = []
    open_listings = status["open_listings"]
    out.append(f"Open listings and removal requests: {len(open_listings)}")
    for listing in open_listings:
        out += _listing_lines(listing, now)
    undelivered = status["undelivered"]
    out.append("")
    out.append(f"Notifications not delivered: {len(undelivered)}")
    for item in undelivered:
        out.append(
            f"  #{item['id']} {item['kind']} for {item['ip']} on {item['zone']}: {item['state']} "
            f"after {item['attempts']} attempts, last error: {printable(item['last_error'] or '-')}"
        )
    out.append("")
    out.append(f"History (closed listings, newest first): {len(status['history'])}")
    for listing in status["history"]:
        out += _listing_lines(listing, now)
    out.append("")
    out.append("Last checks:")
    for check in status["checks"]:
        if check["exit_code"] is None:
            out.append(f"  #{check['id']} {check['started_at']}: did not finish")
            continue
        out.append(
            f"  #{check['id']} {check['started_at']}: exit {check['exit_code']} "
            f"({EXIT_NAMES.get(check['exit_code'], '?')}), listed {check['listed']}, "
            f"unknown {check['unknown']}, clean {check['clean']}"
        )
    return "\n".join(out)


def _listing_lines(listing: dict[str, Any], now: str) -> list[str]:
    weight = "major" if listing["major"] else "minor"
    head = f"  {listing['ip']} on {list_label(listing)}, {weight}"
    if listing["closed_at"]:
        lasted = duration(listing["opened_at"], listing["closed_at"])
        head += f": {listing['opened_at']} -> {listing['closed_at']} (lasted {lasted})"
    else:
        head += f": since {listing['opened_at']} (for {duration(listing['opened_at'], now)}), "
        head += f"last seen {listing['last_seen_at']}"
    request = f"    removal request #{listing['request_id']}: {listing['procedure_text']}"
    request += "; " + (
        "closed " + listing["request_closed_at"] if listing["request_closed_at"] else "open"
    )
    if listing["ticket_id"]:
        request += f"; ticket {listing['ticket_id']}"
    if listing["removal_mail_sent_at"]:
        request += f"; removal mail sent {listing['removal_mail_sent_at']}"
    answer = f"    answer: {listing['meaning']}" + (
        f"; reason: {listing['reason']}" if listing["reason"] else ""
    )
    return [head, answer, request]
