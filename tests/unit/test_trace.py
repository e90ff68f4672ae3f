"""Message tracking (issue 15, point 4): the relay's own log lines (written by its formatters,
text and JSON) of a customer -> good gateway -> bad gateway -> far end path and a bounce are
found by Message-ID, any hop's queue id, sender or recipient, and joined into the path with
the three queue ids; the SSH command quotes what it sends."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from deploykit.trace import remote_command, ssh_argv
from gateway.cli import main
from gateway.delivery.outcome import queued_as
from gateway.intake.handler import message_id
from gateway.log import JsonFormatter, TextFormatter, event
from gateway.trace import Criteria, parse_line, paths, render, search, unknown_next_ids

MID = "<gtube-1@customer-a.example>"
A = "<a@customer-a.example>"
CUST = "198.51.100.30"


def _log(formatter: logging.Formatter, calls: list[tuple]) -> list[str]:
    stream = io.StringIO()
    logger = logging.getLogger(f"smg.test.trace.{id(stream)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for name, queue_id, fields in calls:
        event(logger, name, queue_id, **fields)
    return stream.getvalue().splitlines()


def _fleet_logs() -> dict[str, list[str]]:
    good = _log(TextFormatter(), [
        ("connect", None, {"client": "198.51.100.30"}),
        ("received", "1GOOD0000000A", {"client": CUST, "sender": A,
         "nrcpt": 1, "action": "reroute", "decided_by": "spam", "message_id": MID,
         "to": "<b@partner-plain.example>", "verdicts": "virus=clean;spam=spam 1000.0/6"}),
        ("delivery", "1GOOD0000000A", {"to": "<b@partner-plain.example>",
         "relay": "198.51.100.12[198.51.100.12]:25", "status": "sent", "route": "bad_gateway",
         "reply": "250 2.0.0 Ok: queued as 1BAD00000000B", "queued_as": "1BAD00000000B"}),
        ("received", "1OTHER0000000", {"client": CUST, "sender": "<x@customer-a.example>",
         "message_id": "<other@x>", "to": "<c@partner-tls.example>"}),
    ])  # fmt: skip
    bad = _log(JsonFormatter(), [
        ("received", "1BAD00000000B", {"client": "198.51.100.10", "sender": A,
         "action": "accept", "message_id": MID, "to": "<b@partner-plain.example>"}),
        ("delivery", "1BAD00000000B", {"to": "<b@partner-plain.example>",
         "relay": "mx.partner-plain.example[198.51.100.21]:25", "status": "bounced",
         "reply": "550 5.1.1 no such user"}),
        ("ndr", "1BAD00000000B", {"ndr": "1NDR00000000C", "to": "<a@customer-a.example>"}),
        ("delivery", "1NDR00000000C", {"to": "<a@customer-a.example>", "status": "sent",
         "relay": "mx.customer-a.example[198.51.100.30]:25", "reply": "250 2.0.0 Ok: 9F00D"}),
    ])  # fmt: skip
    return {"otc-de-mta01": good, "otc-de-mta03": bad}


def _records(criteria: Criteria) -> list[dict]:
    out = []
    for host, lines in _fleet_logs().items():
        for record in search(lines, criteria):
            out.append({**record, "host": host})
    return out


def test_lines_of_both_formats_parse() -> None:
    logs = _fleet_logs()
    text = parse_line(logs["otc-de-mta01"][1])
    assert text is not None and text["queue_id"] == "1GOOD0000000A"
    assert text["fields"]["verdicts"] == "virus=clean;spam=spam 1000.0/6"
    assert text["fields"]["message_id"] == MID
    assert parse_line(logs["otc-de-mta01"][0]) is None  # a connect line is no mail event
    assert parse_line(logs["otc-de-mta03"][0])["fields"]["client"] == "198.51.100.10"


@pytest.mark.parametrize(
    "criteria",
    [
        Criteria(message_id=MID),
        Criteria(sender="A@customer-a.example"),
        Criteria(recipient="b@partner-plain.example"),
    ],
)
def test_path_good_bad_far_end_with_the_ndr(criteria: Criteria) -> None:
    result = paths(_records(criteria))
    (message,) = result["messages"]
    assert [(h["host"], h["queue_id"]) for h in message["hops"]] == [
        ("otc-de-mta01", "1GOOD0000000A"),
        ("otc-de-mta03", "1BAD00000000B"),
    ]
    assert message["hops"][0]["verdicts"] == "virus=clean;spam=spam 1000.0/6"
    assert message["hops"][0]["deliveries"][0]["queued_as"] == "1BAD00000000B"
    (ndr,) = message["ndrs"]
    assert ndr["queue_id"] == "1NDR00000000C" and ndr["deliveries"][0]["queued_as"] is None
    text = render(result)
    assert "otc-de-mta01  1GOOD0000000A" in text and "otc-de-mta03  1BAD00000000B" in text
    assert "NDR:" in text


def test_a_queue_id_of_the_first_hop_is_followed_to_the_next() -> None:
    first = _records(Criteria(queue_ids=frozenset({"1GOOD0000000A"})))
    assert {r["host"] for r in first} == {"otc-de-mta01"}
    assert unknown_next_ids(first) == {"1BAD00000000B"}
    second = _records(Criteria(queue_ids=frozenset({"1BAD00000000B"})))
    (message,) = paths(first + second)["messages"]
    assert len(message["hops"]) == 2


def test_far_end_queue_id_and_reply_helpers() -> None:
    assert queued_as("250 2.0.0 Ok: queued as 4QxY7z") == "4QxY7z"
    assert queued_as("250 OK id=1rAbCd-000123-Xy") == "1rAbCd-000123-Xy"
    assert queued_as("250 2.0.0 Ok") is None
    data = b"Received: x\r\nMessage-Id:  <a@b>\r\nSubject: s\r\n\r\nMessage-ID: <body@x>\r\n"
    assert message_id(data) == "<a@b>"
    assert message_id(b"Subject: s\r\n\r\nMessage-ID: <body@x>\r\n") == "-"


def test_smg_trace_reads_a_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smg.log"
    path.write_text("\n".join(_fleet_logs()["otc-de-mta01"]) + "\n")
    assert main(["trace", "--message-id", MID, "--file", str(path), "--records"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event"] for r in records] == ["received", "delivery"]
    assert main(["trace", "--sender", "a@customer-a.example", "--file", str(path)]) == 0
    assert "1GOOD0000000A" in capsys.readouterr().out
    assert main(["trace", "--file", str(path)]) == 2  # no criteria
    assert main(["trace", "--sender", "x", "--since", "1d; rm -rf /", "--file", str(path)]) == 1


def test_ssh_command_is_quoted() -> None:
    from deploykit.host import Gateway
    from deploykit.problems import Source

    gateway = Gateway(
        "otc-de-mta01", "good", {"public_address": "198.51.100.10"}, Source("f", "x"),
        connection={"ssh_user": "ops", "ssh_key": "/k", "ssh_hostname": "mta01.example"},
    )  # fmt: skip
    remote = remote_command(Criteria(message_id="<a'b@x>"), "-1d", None)
    argv = ssh_argv(gateway, remote)
    assert argv[argv.index("-l") + 1] == "ops" and argv[-2] == "mta01.example"
    assert argv[-1].startswith("sudo -n /opt/smg/venv/bin/smg trace --records --message-id ")
    assert "'<a'\"'\"'b@x>'" in argv[-1]
