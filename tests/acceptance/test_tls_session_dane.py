"""Forced TLS answered in the session, and DANE, on the deployed lab fleet (issue 14).

The lab (lab/zones.py): partner-tls.example, partner-plain.example and partner-dane-bad.example
are DNSSEC-signed by the lab's knot; partner-tls publishes a TLSA record for mx-tls's key,
partner-dane-bad points at mx-tls with a TLSA record for another key, partner-plain has none.
partner-slow's MX is an address where nothing answers.  Rules (inventories/lab.py):
customer-b -> partner-plain (encrypt, reject), -> partner-tls (dane, reject), -> partner-slow
(encrypt, reject).  Each gateway asks its own validating unbound.
"""

from __future__ import annotations

import pytest

from bench.fleet import mail
from tests.acceptance.lab_fleet import Fleet, wait_for
from tests.acceptance.test_mechanisms import (
    CUSTOMER_A,
    CUSTOMER_B,
    PLAIN_DOMAIN,
    TLS_DOMAIN,
    maillog_mark,
    only_copy,
    sessions_since,
)

pytestmark = pytest.mark.lab

DANE_BAD, SLOW = "partner-dane-bad.example", "partner-slow.example"


def test_reject_rule_without_starttls_is_refused_in_the_session(fleet: Fleet) -> None:
    gateway = fleet.gateways["otc-de-mta01"]
    tag = mail.new_tag("sess-plain")
    sent = fleet.send(gateway, "ham", tag, f"{tag}@{CUSTOMER_B}", f"{tag}@{PLAIN_DOMAIN}")
    assert not sent.accepted and sent.said("550 5.7.10"), sent.transcript
    assert not gateway.queued_for(f"{tag}@{PLAIN_DOMAIN}"), "nothing may be queued"
    assert not fleet.mailboxes.tagged(tag)


def test_reject_rule_to_a_healthy_far_end_is_accepted_and_goes_over_dane(fleet: Fleet) -> None:
    gateway = fleet.gateways["otc-de-mta02"]
    tag = mail.new_tag("sess-tls")
    sent = fleet.send(gateway, "ham", tag, f"{tag}@{CUSTOMER_B}", f"{tag}@{TLS_DOMAIN}")
    assert sent.accepted, sent.transcript
    copy = only_copy(fleet, tag)
    assert copy.tls_protocol in ("TLSv1.2", "TLSv1.3"), copy
    assert "verify=dane" in gateway.journal(lines=400)


def test_probe_timeout_gives_450(fleet: Fleet) -> None:
    gateway = fleet.gateways["otc-de-mta01"]
    tag = mail.new_tag("sess-slow")
    sent = fleet.send(gateway, "ham", tag, f"{tag}@{CUSTOMER_B}", f"{tag}@{SLOW}")
    assert not sent.accepted and sent.said("450 4.7.10"), sent.transcript
    assert not gateway.queued_for(f"{tag}@{SLOW}")


def test_dane_mismatch_is_deferred_and_never_sent(fleet: Fleet) -> None:
    gateway = fleet.gateways["otc-de-mta01"]
    tag = mail.new_tag("dane-bad")
    rcpt = f"{tag}@{DANE_BAD}"
    mark = maillog_mark(fleet, "mx-tls")
    sent = fleet.send(gateway, "ham", tag, f"alice@{CUSTOMER_A}", rcpt)
    assert sent.accepted, sent.transcript  # no rule: opportunistic DANE decides at delivery

    def deferred() -> list:
        return [m for m in gateway.queued_for(rcpt) if m["attempts"] >= 1]

    (entry,) = wait_for(f"{rcpt} deferred", deferred, 60)
    reply = entry["recipients"][0].get("last_reply") or ""
    assert "DANE authentication failed" in reply, entry
    sessions = sessions_since(fleet, "mx-tls", mark, gateway.address)
    assert all(" mail=" not in line for line in sessions), sessions  # not even MAIL FROM
    assert not fleet.mailboxes.tagged(tag)


def test_signed_domain_without_tlsa_is_unaffected(fleet: Fleet) -> None:
    gateway = fleet.gateways["otc-de-mta02"]
    tag = mail.new_tag("dane-none")
    sent = fleet.send(gateway, "ham", tag, f"alice@{CUSTOMER_A}", f"{tag}@{PLAIN_DOMAIN}")
    assert sent.accepted, sent.transcript
    copy = only_copy(fleet, tag)
    assert copy.server == "mx-plain" and copy.tls_protocol is None  # as before: no STARTTLS


def test_tls_report_reaches_the_reporting_domains_mailbox(fleet: Fleet) -> None:
    """RFC 8460: partner-tls.example publishes ``_smtp._tls`` with rua=mailto:tlsrpt@...; a
    good gateway's report of today (``smg tls report --send``) arrives at mx-tls and its
    gzip'd JSON validates against the RFC's format."""
    import datetime as dt
    import email
    import email.policy
    import gzip
    import json
    from pathlib import Path

    import jsonschema

    gateway = fleet.gateways["otc-de-mta02"]
    tag = mail.new_tag("tlsrpt")
    sent = fleet.send(gateway, "ham", tag, f"alice@{CUSTOMER_A}", f"{tag}@{TLS_DOMAIN}")
    assert sent.accepted, sent.transcript
    only_copy(fleet, tag)  # one TLS session to count
    today = dt.datetime.now(dt.UTC).date().isoformat()
    result = gateway.smg(f"tls report --send --since {today} --config /etc/smg/smg.toml")
    assert result.rc == 0 and "sent to tlsrpt@partner-tls.example" in result.stdout, result

    def report() -> list:
        return fleet.arrivals(
            lambda a: a.server == "mx-tls" and a.recipient == "tlsrpt@partner-tls.example"
        )

    arrival = wait_for("the TLS report at mx-tls", report, 60)[-1]
    message = email.message_from_bytes(arrival.read(), policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    (part,) = list(message.iter_attachments())
    data = json.loads(gzip.decompress(part.get_content()))
    schema_path = Path(__file__).parents[1] / "data" / "tlsrpt-schema.json"
    jsonschema.validate(data, json.loads(schema_path.read_text()))
    # One entry per policy type the sessions ran under (RFC 8460 4.4): "tlsa" under DANE, and
    # e.g. "no-policy-found" for sessions under a customer's PKIX verify rule.
    policies = [p for p in data["policies"] if p["policy"]["policy-domain"] == TLS_DOMAIN]
    types = [p["policy"]["policy-type"] for p in policies]
    assert policies and len(types) == len(set(types)), types
    assert sum(p["summary"]["total-successful-session-count"] for p in policies) >= 1
