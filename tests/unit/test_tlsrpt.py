"""TLS reports (RFC 8460): counting, the report, its schema, the rua record, the mail."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import json
from pathlib import Path

import jsonschema

from gateway.tls.tlsrpt import TlsRptCounts, build_reports, parse_rua, report_mail, result_type

SCHEMA = json.loads((Path(__file__).parents[1] / "data" / "tlsrpt-schema.json").read_text())
DAY = dt.date(2026, 12, 4)
NOON = dt.datetime(2026, 12, 4, 12, tzinfo=dt.UTC).timestamp()


def test_counts_become_a_report_that_validates(tmp_path) -> None:
    counts = TlsRptCounts(tmp_path / "tls-rpt.sqlite", clock=lambda: NOON)
    for _ in range(3):
        counts.count("partner.example", "tlsa", "mx.partner.example", "198.51.100.10")
    dane_failed = result_type("TLS failed: DANE authentication failed: no TLSA record matches")
    counts.count("partner.example", "tlsa", "mx.partner.example", "198.51.100.10", dane_failed)
    counts.count("plain.example", "no-policy-found", "mx.plain.example", "198.51.100.10",
                 result_type("STARTTLS not offered"))  # fmt: skip
    again = TlsRptCounts(tmp_path / "tls-rpt.sqlite")  # another worker: the same counts
    reports = build_reports(again.rows(DAY, DAY), DAY, DAY, "gw.example.net", "postmaster@gw")
    assert set(reports) == {"partner.example", "plain.example"}
    for report in reports.values():
        jsonschema.validate(report, SCHEMA)
    (policy,) = reports["partner.example"]["policies"]
    assert policy["summary"] == {"total-successful-session-count": 3,
                                 "total-failure-session-count": 1}  # fmt: skip
    assert policy["failure-details"][0]["result-type"] == "tlsa-invalid"
    assert reports["partner.example"]["date-range"] == {
        "start-datetime": "2026-12-04T00:00:00Z",
        "end-datetime": "2026-12-05T00:00:00Z",
    }
    assert not build_reports(again.rows(DAY + dt.timedelta(1), DAY + dt.timedelta(1)),
                             DAY, DAY, "gw", "pm")  # fmt: skip


def test_result_types() -> None:
    assert result_type("STARTTLS not offered") == "starttls-not-supported"
    assert result_type("TLS failed: ... certificate has expired") == "certificate-expired"
    assert result_type("TLS failed: ... Hostname mismatch, ...") == "certificate-host-mismatch"
    assert result_type("TLS failed: unable to get local issuer certificate") == (
        "certificate-not-trusted"
    )


def test_rua() -> None:
    assert parse_rua(["v=TLSRPTv1; rua=mailto:tls@p.example,https://r.example/x"]) == [
        "tls@p.example"
    ]
    assert parse_rua(["v=spf1 -all"]) == []
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@x", "v=TLSRPTv1; rua=mailto:b@x"]) == []


def test_report_mail_is_rfc8460_multipart_report() -> None:
    counts = TlsRptCounts(clock=lambda: NOON)
    counts.count("partner.example", "tlsa", "mx.partner.example", "198.51.100.10")
    (report,) = build_reports(counts.rows(DAY, DAY), DAY, DAY, "gw", "pm").values()
    raw = report_mail(report, "tlsrpt@gw.example.net", "tls@partner.example", "gw.example.net")
    assert b"\n" not in raw.replace(b"\r\n", b""), "every line ends with CRLF (no bare LF)"
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "partner.example"
    (part,) = [p for p in message.iter_attachments()]
    assert part.get_content_type() == "application/tlsrpt+gzip"
    jsonschema.validate(json.loads(gzip.decompress(part.get_content())), SCHEMA)
