"""NDRs parsed back with Python's email package: structure, per-message and per-recipient
fields, original headers only, the spam explanation, the virus information mail."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from gateway.dsn import FailedRecipient, make_info_ndr, make_ndr, status_from_reply

ORIGINAL = (
    b"From: Alice <alice@customer.example>\r\n"
    b"To: bob@far.example\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <report-1@customer.example>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n"
)


def parse(data: bytes) -> EmailMessage:
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    return email.message_from_bytes(data, policy=email.policy.default)


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())


def ndr(**kw) -> EmailMessage:
    args = {
        "hostname": "gw1.example.net",
        "sender": "alice@customer.example",
        "original": ORIGINAL,
        "failed": [
            FailedRecipient(
                "bob@far.example",
                "5.1.1",
                "550 5.1.1 <bob@far.example>: no such user",
                "mx.far.example",
            )
        ],
        "queue_id": "1K1ABCDEFGHJK",
        "arrival": 1_700_000_000.0,
    }
    args.update(kw)
    return parse(make_ndr(**args))


def test_structure_and_headers() -> None:
    message = ndr()
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert str(message["From"]) == "Mail Delivery System <MAILER-DAEMON@gw1.example.net>"
    assert message["To"].addresses[0].addr_spec == "alice@customer.example"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"].endswith("@gw1.example.net>")
    types = [p.get_content_type() for p in parts(message)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_delivery_status_fields() -> None:
    status = parts(ndr())[1]
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw1.example.net"
    assert "Nov 2023" in per_message["Arrival-Date"]
    assert per_recipient["Final-Recipient"] == "rfc822; bob@far.example"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.far.example"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@far.example>: no such user"


def test_one_block_per_failed_recipient_and_our_own_reasons() -> None:
    failed = [
        FailedRecipient("a@null.example", "5.1.10", reason="domain accepts no mail (null MX)"),
        FailedRecipient("b@far.example", "4.4.7", reason="message expired after 5 days"),
    ]
    blocks = parts(ndr(failed=failed))[1].get_payload()[1:]
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; a@null.example",
        "rfc822; b@far.example",
    ]
    assert [b["Status"] for b in blocks] == ["5.1.10", "4.4.7"]
    assert blocks[0]["Remote-MTA"] is None
    assert "null MX" in blocks[0]["Diagnostic-Code"]


def test_original_headers_only_never_the_body() -> None:
    message = ndr()
    quoted = parts(message)[2].get_content()
    assert "Subject: quarterly report" in quoted
    assert "Message-ID: <report-1@customer.example>" in quoted
    assert b"SECRET BODY LINE" not in message.as_bytes()


def test_human_part_explains_and_names_the_message() -> None:
    text = parts(ndr())[0].get_content()
    assert "could not be delivered" in text
    assert "quarterly report" in text and "<report-1@customer.example>" in text
    assert "mx.far.example said: 550 5.1.1" in text
    assert "spam" not in text


def test_spam_verdict_is_explained() -> None:
    facts = {
        "spam": {
            "score": 15.2,
            "required_score": 6.0,
            "symbols": {"GTUBE": 15.0, "MISSING_DATE": 1.0},
        }
    }
    text = parts(ndr(facts=facts))[0].get_content()
    assert "classified as spam" in text
    assert "15.2" in text and "GTUBE" in text and "MISSING_DATE" in text
    assert "Bad Gateway" in text


def test_long_replies_are_folded_not_broken() -> None:
    reply = "550 5.7.1 " + " ".join(["policy"] * 40)
    failed = [FailedRecipient("b@far.example", "5.7.1", reply, "mx.far.example")]
    block = parts(ndr(failed=failed))[1].get_payload()[1]
    assert " ".join(block["Diagnostic-Code"].split()) == f"smtp; {reply}"


def test_never_to_the_null_sender() -> None:
    with pytest.raises(ValueError):
        ndr(sender="")


def test_status_from_reply() -> None:
    assert status_from_reply(550, "5.1.1 unknown") == "5.1.1"
    assert status_from_reply(451, "try later") == "4.0.0"
    assert status_from_reply(550, "4.2.2 mismatched class") == "5.0.0"
    assert status_from_reply(552, "no code", default="5.3.4") == "5.3.4"


def test_virus_information_mail() -> None:
    original = ORIGINAL.replace(b"SECRET BODY LINE", b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR")
    data = make_info_ndr(
        hostname="gw1.example.net",
        sender="alice@customer.example",
        recipients=["bob@far.example", "carol@far.example"],
        virus="SMG-Test.EICAR.UNOFFICIAL",
        original=original,
        queue_id=None,
    )
    assert b"EICAR\r\n" not in data and b"X5O!P" not in data  # no infected content
    message = parse(data)
    assert "SMG-Test.EICAR.UNOFFICIAL" in str(message["Subject"])
    text = parts(message)[0].get_content()
    for needle in (
        "SMG-Test.EICAR.UNOFFICIAL",
        "quarterly report",
        "<report-1@customer.example>",
        "bob@far.example, carol@far.example",
    ):
        assert needle in text
    blocks = parts(message)[1].get_payload()[1:]
    assert [b["Status"] for b in blocks] == ["5.7.1", "5.7.1"]
    with pytest.raises(ValueError):
        make_info_ndr(
            hostname="h.example",
            sender="",
            recipients=["b@x.example"],
            virus="V",
            original=original,
        )
