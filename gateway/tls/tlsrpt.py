"""SMTP TLS Reporting (RFC 8460): count TLS successes and failures per policy domain, and build
the daily aggregate report a domain asks for in its ``_smtp._tls`` TXT record.

Delivery counts each session it tried under TLS (:meth:`TlsRptCounts.count`): per UTC day,
recipient (policy) domain, policy type (``tlsa`` under DANE, ``sts`` under MTA-STS, else
``no-policy-found``), MX host, sending address and result (``""`` for success, else an RFC 8460
result type).  Counts live in ``<spool>/tls-rpt.sqlite``, shared by the workers.

``smg tls report --since DAY`` prints the reports; ``--send`` mails each (JSON, gzip, the
``application/tlsrpt+gzip`` part of RFC 8460 section 5.3) to the ``rua=mailto:`` addresses of
the domain's ``v=TLSRPTv1`` record.  Domains without such a record get no report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("smg.tls")

STATE_FILE = "tls-rpt.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL, domain TEXT NOT NULL, policy TEXT NOT NULL, mx TEXT NOT NULL,
    ip TEXT NOT NULL, result TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, policy, mx, ip, result));
"""


def result_type(reason: str) -> str:
    """The RFC 8460 section 4.3 result type for one of delivery's TLS failure reasons."""
    text = reason.lower()
    if "starttls not offered" in text:
        return "starttls-not-supported"
    if "dane" in text or "tlsa" in text:
        return "tlsa-invalid" if "lookup" not in text else "dnssec-invalid"
    if "expired" in text:
        return "certificate-expired"
    if "hostname mismatch" in text or "name does not match" in text:
        return "certificate-host-mismatch"
    if "certificate" in text or "verify failed" in text or "not trusted" in text:
        return "certificate-not-trusted"
    return "validation-failure"


class TlsRptCounts:
    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        try:
            self._db = sqlite3.connect(str(path) if path else ":memory:", timeout=2.0,
                                       isolation_level=None, check_same_thread=False)  # fmt: skip
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # a count lost in a crash: fine
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            log.warning("cannot use %s: %s (TLS reports from this process's memory)", path, exc)
            self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self._db.executescript(_SCHEMA)

    def count(self, domain: str, policy: str, mx: str, ip: str, result: str = "") -> None:
        day = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date().isoformat()
        with contextlib.suppress(sqlite3.Error):
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT "
                "(day, domain, policy, mx, ip, result) DO UPDATE SET count = count + 1",
                (day, domain.lower(), policy, mx.lower(), ip, result),
            )

    def rows(self, since: dt.date, until: dt.date) -> list[tuple[str, ...]]:
        return self._db.execute(
            "SELECT day, domain, policy, mx, ip, result, count FROM sessions "
            "WHERE day >= ? AND day <= ? ORDER BY domain, policy, mx",
            (since.isoformat(), until.isoformat()),
        ).fetchall()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


def build_reports(
    rows: list[tuple[Any, ...]], since: dt.date, until: dt.date, organization: str, contact: str
) -> dict[str, dict[str, Any]]:
    """One RFC 8460 report (section 4.4) per policy domain, from :meth:`TlsRptCounts.rows`."""
    start = dt.datetime.combine(since, dt.time(), dt.UTC)
    end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.UTC)
    by_domain: dict[str, dict[str, dict[str, Any]]] = {}
    for _day, domain, policy, mx, ip, result, count in rows:
        entry = by_domain.setdefault(domain, {}).setdefault(
            policy,
            {
                "policy": {"policy-type": policy, "policy-domain": domain, "mx-host": []},
                "summary": {
                    "total-successful-session-count": 0,
                    "total-failure-session-count": 0,
                },
                "failure-details": [],
            },
        )
        if mx not in entry["policy"]["mx-host"]:
            entry["policy"]["mx-host"].append(mx)
        if not result:
            entry["summary"]["total-successful-session-count"] += count
            continue
        entry["summary"]["total-failure-session-count"] += count
        entry["failure-details"].append({"result-type": result, "sending-mta-ip": ip,
                                         "receiving-mx-hostname": mx,
                                         "failed-session-count": count})  # fmt: skip
    reports = {}
    for domain, policies in by_domain.items():
        reports[domain] = {
            "organization-name": organization,
            "date-range": {"start-datetime": _rfc3339(start), "end-datetime": _rfc3339(end)},
            "contact-info": contact,
            "report-id": f"{since.isoformat()}_{until.isoformat()}_{domain}@{organization}",
            "policies": [
                {k: v for k, v in p.items() if k != "failure-details" or v}
                for p in policies.values()
            ],
        }
    return reports


def _rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rua(txt_records: list[str]) -> list[str]:
    """The ``mailto:`` addresses of the single ``v=TLSRPTv1`` record (RFC 8460 section 3)."""
    records = [t for t in txt_records if t.replace(" ", "").startswith("v=TLSRPTv1")]
    if len(records) != 1:
        return []
    fields = dict(part.strip().partition("=")[::2] for part in records[0].split(";") if "=" in part)
    return [
        uri[len("mailto:"):].split("!", 1)[0]
        for uri in (u.strip() for u in fields.get("rua", "").split(","))
        if uri.lower().startswith("mailto:")
    ]  # fmt: skip


def report_mail(report: dict[str, Any], sender: str, recipient: str, submitter: str) -> bytes:
    """The report as RFC 8460 section 5.3 mail: a multipart/report with the gzip'd JSON."""
    from email.message import EmailMessage
    from email.policy import SMTP
    from email.utils import formatdate, make_msgid

    domain = report["policies"][0]["policy"]["policy-domain"] if report["policies"] else ""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    report_id = report["report-id"]
    message["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=submitter)
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message.set_content(f"This is an aggregate TLS report from {submitter} (RFC 8460).\n")
    data = gzip.compress(json.dumps(report, indent=1).encode())
    name = f"{submitter}!{domain}!{report['report-id'].split('_')[0]}.json.gz"
    message.add_attachment(data, maintype="application", subtype="tlsrpt+gzip", filename=name)
    message.set_type("multipart/report")  # keeps the boundary
    message.set_param("report-type", "tlsrpt")
    # CRLF line ends: smtplib sends bytes as they are, and a bare LF is refused by hardened
    # receivers (our own intake and Postfix with smtpd_forbid_bare_newline both answer 550).
    return message.as_bytes(policy=SMTP)
