"""`smg blacklist check|status` against real neighbours, through the real CLI.

- DNS: the harness's knotd (session server) serving DNSBL zones made for each test
  (``set_zone`` lists and unlists addresses, ``servfail_zone``, ``dead_nameserver``);
- SMTP: the harness's SmtpSink on loopback receiving the notices and removal mails;
- tickets: a tiny HTTP server in a thread on 127.0.0.x recording the JSON POSTs.

Every check is a `smg blacklist check` subprocess, so exit codes are the real ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness import KnotDNS, SmtpSink
from tests.harness.util import free_port

pytestmark = pytest.mark.integration

SMG = Path(sys.executable).parent / "smg"
GOOD = "198.51.100.10"
OTHER = "198.51.100.11"
V6 = "2001:db8::25"
OPS = "ops@example.net"
PROVIDER = "delist@minor.example.net"


# --- neighbours ---------------------------------------------------------------------------------


class TicketServer:
    """Records every POST (path, headers, JSON); answers ``{"id": "CHG-n"}`` to an opening."""

    def __init__(self, address: str = "127.0.0.72") -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail_with: int | None = None  # answer this HTTP status instead
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                if owner.fail_with:
                    self.send_error(owner.fail_with)
                    return
                owner.posts.append({"path": self.path, "headers": dict(self.headers), "json": body})
                reply = {"id": f"CHG-{len(owner.posts)}"} if body.get("action") == "open" else {}
                data = json.dumps(reply).encode()
                self.send_response(201 if reply else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.url = f"http://{address}:{self.server.server_port}/api/tickets"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class Mailbox:
    """What the harness's SMTP sink received, parsed: (envelope recipients, message)."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    @property
    def relay(self) -> str:
        return self.sink.endpoint

    def all(self) -> list[tuple[list[str], EmailMessage]]:
        return [
            (list(m.rcpt_tos), message_from_bytes(m.data, policy=policy.default))
            for m in self.sink.messages
        ]


@pytest.fixture
def tickets() -> Iterator[TicketServer]:
    server = TicketServer()
    yield server
    server.close()


@pytest.fixture
def mailbox(smtp_sink: Callable[..., SmtpSink]) -> Mailbox:
    return Mailbox(smtp_sink("127.0.0.73"))


# --- helpers ----------------------------------------------------------------------------------


def reverse(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


def dnsbl_zone(listed: dict[str, tuple[str, str]] | None = None) -> str:
    """Zone text: the RFC 5782 test point and ``{ip: (code, txt)}`` listings."""
    lines = ["2.0.0.127 A 127.0.0.2", '2.0.0.127 TXT "test point"']
    for ip, (code, txt) in (listed or {}).items():
        owner = reverse(ip) if ":" not in ip else _nibbles(ip)
        lines.append(f"{owner} A {code}")
        if txt:
            lines.append(f'{owner} TXT "{txt}"')
    return "\n".join(lines) + "\n"


def _nibbles(ip: str) -> str:
    import ipaddress

    return ".".join(reversed(ipaddress.ip_address(ip).exploded.replace(":", "")))


def unique(prefix: str) -> str:
    """Zone names unique to the test: the knot server is shared by the session."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}.dnsbl.test"


def write_config(
    tmp_path: Path,
    knot: KnotDNS | None,
    zones: list[dict[str, Any]],
    *,
    relay: str | None = None,
    ticket_url: str | None = None,
    nameserver: str | None = None,
    addresses: list[str] | None = None,
) -> Path:
    lines = [
        "[gateway]",
        'hostname = "gw1.example.net"',
        "[spam]",
        "enabled = false",
        "[blacklist]",
        f"addresses = {json.dumps(addresses or [GOOD, OTHER])}",
        f'nameservers = ["{nameserver or knot.nameserver}"]',  # type: ignore[union-attr]
        'timeout = "1s"',
        'notify_timeout = "5s"',
        f'state = "{tmp_path / "blacklist.sqlite"}"',
    ]
    if relay:
        lines += [f'operations_mailbox = "{OPS}"', f'notify_via = "{relay}"']
    if ticket_url:
        lines.append(f'ticket_url = "{ticket_url}"')
    for zone in zones:
        lines.append("[[blacklist.zones]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in zone.items()]
    path = tmp_path / "smg.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def smg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SMG), "blacklist", *args], capture_output=True, text=True, timeout=timeout
    )


def check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return smg("check", "--config", str(config), *extra)


def status(config: Path) -> dict[str, Any]:
    result = smg("status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- the acceptance flow ----------------------------------------------------------------------


def test_listed_notified_once_then_delisted_and_closed(
    tmp_path: Path, knot_dns: KnotDNS, mailbox: Mailbox, tickets: TicketServer
) -> None:
    major, minor = unique("major"), unique("minor")
    reason = "spam trap hit, see https://major.dnsbl.test/lookup?198.51.100.10"
    knot_dns.set_zone(major, dnsbl_zone({GOOD: ("127.0.0.2", reason)}))
    knot_dns.set_zone(minor, dnsbl_zone())
    config = write_config(
        tmp_path,
        knot_dns,
        [
            {"zone": major, "name": "Lab major list", "major": True,
             "removal_url": "https://major.dnsbl.test/remove"},
            {"zone": minor, "removal_mail": PROVIDER},
        ],
        relay=mailbox.relay,
        ticket_url=tickets.url,
    )  # fmt: skip

    first = check(config)
    assert first.returncode == 2, first.stdout + first.stderr
    assert first.stdout.startswith(
        f"BLACKLIST CRITICAL - listed on a major list: {GOOD} on Lab major list |"
    )
    row = next(
        line for line in first.stdout.splitlines() if line.startswith(GOOD) and major in line
    )
    assert "listed" in row and reason in row

    # The ticket, then the notice naming it (no removal mail: the major list has a form).
    [opened] = tickets.posts
    assert opened["path"] == "/api/tickets"
    assert opened["headers"]["Content-Type"] == "application/json"
    ticket = opened["json"]
    assert (ticket["action"], ticket["ip"], ticket["zone"], ticket["reason"]) == (
        "open", GOOD, major, reason
    )  # fmt: skip
    assert ticket["procedure"] == "form"
    assert ticket["removal_url"] == "https://major.dnsbl.test/remove"
    assert ticket["since"].endswith("Z")
    [(rcpts, notice)] = mailbox.all()
    assert rcpts == [OPS]
    assert str(notice["Subject"]) == (
        f"[smg blacklist] LISTED: {GOOD} on Lab major list ({major}) - major list"
    )
    body = notice.get_content()
    for words in (
        f"Address:       {GOOD}",
        "Answer:        127.0.0.2 listed",
        f"Reason (TXT):  {reason}",
        "Listed since:  20",
        "Procedure:     delisting form https://major.dnsbl.test/remove",
        "Ticket:        CHG-1",
    ):
        assert words in body, (words, body)

    # Repeated checks: still exit 2, nothing new anywhere.
    for _ in range(2):
        again = check(config)
        assert again.returncode == 2
        assert "new listings" not in again.stdout
    assert len(mailbox.all()) == 1 and len(tickets.posts) == 1
    snapshot = status(config)
    [listing] = snapshot["open_listings"]
    assert (listing["ip"], listing["zone"], listing["ticket_id"]) == (GOOD, major, "CHG-1")
    assert listing["request_closed_at"] is None
    assert len(snapshot["checks"]) == 3

    # The list drops the address: the request closes, a delisted notice, the ticket closed.
    knot_dns.set_zone(major, dnsbl_zone())
    gone = check(config)
    assert gone.returncode == 0, gone.stdout
    assert "delisted: 1" in gone.stdout
    [(rcpts, delisted)] = mailbox.all()[1:]
    assert rcpts == [OPS]
    assert str(delisted["Subject"]).startswith(
        f"[smg blacklist] DELISTED: {GOOD} on Lab major list ({major}) after "
    )
    assert "Lasted:" in delisted.get_content()
    closed = tickets.posts[-1]["json"]
    assert (closed["action"], closed["ticket_id"], closed["ip"]) == ("close", "CHG-1", GOOD)
    assert closed["duration_seconds"] >= 0
    snapshot = status(config)
    assert snapshot["open_listings"] == []
    [history] = snapshot["history"]
    assert history["request_closed_at"] == history["closed_at"] is not None
    assert history["ticket_closed_at"] is not None

    # And it stays quiet while clean.
    assert check(config).returncode == 0
    assert len(mailbox.all()) == 2 and len(tickets.posts) == 2
    text = smg("status", "--config", str(config)).stdout
    assert "Open listings and removal requests: 0" in text
    assert f"{GOOD} on Lab major list ({major}), major:" in text


def test_minor_listing_exits_1_and_mails_the_provider(
    tmp_path: Path, knot_dns: KnotDNS, mailbox: Mailbox
) -> None:
    major, minor = unique("major"), unique("minor")
    knot_dns.set_zone(major, dnsbl_zone())
    knot_dns.set_zone(minor, dnsbl_zone({OTHER: ("127.0.0.2", "trap")}))
    config = write_config(
        tmp_path,
        knot_dns,
        [{"zone": major, "major": True}, {"zone": minor, "removal_mail": PROVIDER}],
        relay=mailbox.relay,
    )
    result = check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("BLACKLIST WARNING - listed on a minor list")
    (removal_rcpts, removal), (notice_rcpts, notice) = mailbox.all()
    assert sorted(removal_rcpts) == sorted([PROVIDER, OPS])  # copy to operations
    assert removal["Reply-To"] == OPS
    assert str(removal["Subject"]) == f"Removal request for {OTHER} ({minor})"
    assert f"please remove {OTHER}" in removal.get_content()
    assert notice_rcpts == [OPS]
    assert f"Removal mail:  sent to {PROVIDER}" in notice.get_content()


def test_clean_everywhere_exits_0(tmp_path: Path, knot_dns: KnotDNS) -> None:
    zone = unique("clean")
    knot_dns.set_zone(zone, dnsbl_zone())
    result = check(write_config(tmp_path, knot_dns, [{"zone": zone}]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("BLACKLIST OK - 2 addresses clean on 1 lists |")


def test_ipv6_address_listed_by_nibbles(tmp_path: Path, knot_dns: KnotDNS) -> None:
    zone = unique("v6")
    knot_dns.set_zone(zone, dnsbl_zone({V6: ("127.0.0.2", "v6 trap")}))
    config = write_config(tmp_path, knot_dns, [{"zone": zone, "major": True}], addresses=[GOOD, V6])
    result = check(config, "--json")
    assert result.returncode == 2, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [listed] = [r for r in report["results"] if r["status"] == "listed"]
    assert (listed["ip"], listed["reason"]) == (V6, "v6 trap")
    assert listed["query"] == f"{_nibbles(V6)}.{zone}"


# --- unknown: error answers, SERVFAIL, timeouts ---------------------------------------------------


def test_spamhaus_error_answers_are_unknown(
    tmp_path: Path, knot_dns: KnotDNS, mailbox: Mailbox
) -> None:
    # The real catalogue entry: our knot serves a zen.spamhaus.org zone on loopback only.
    knot_dns.set_zone(
        "zen.spamhaus.org",
        dnsbl_zone({GOOD: ("127.255.255.254", ""), OTHER: ("127.255.255.255", "")}),
    )
    config = write_config(tmp_path, knot_dns, [{"zone": "zen.spamhaus.org"}], relay=mailbox.relay)
    result = check(config, "--json")
    assert result.returncode == 3, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["state"] == "UNKNOWN"
    meanings = {r["ip"]: r["meaning"] for r in report["results"]}
    assert "public/open resolver" in meanings[GOOD]
    assert "excessive number of queries" in meanings[OTHER]
    assert {r["status"] for r in report["results"]} == {"unknown"}
    assert mailbox.all() == []
    assert status(config)["open_listings"] == []


def test_servfail_is_unknown_and_keeps_an_open_listing_open(
    tmp_path: Path, knot_dns: KnotDNS, mailbox: Mailbox
) -> None:
    zone = unique("servfail")
    knot_dns.set_zone(zone, dnsbl_zone({GOOD: ("127.0.0.2", "x")}))
    config = write_config(tmp_path, knot_dns, [{"zone": zone, "major": True}], relay=mailbox.relay)
    assert check(config).returncode == 2
    knot_dns.servfail_zone(zone)
    result = check(config)
    assert result.returncode == 3, result.stdout
    assert "SERVFAIL" in result.stdout
    assert len(mailbox.all()) == 1  # the listed notice only: no "delisted"
    [listing] = status(config)["open_listings"]
    assert listing["ip"] == GOOD


def test_dead_nameserver_times_out_as_unknown(tmp_path: Path, knot_dns: KnotDNS) -> None:
    dead = knot_dns.dead_nameserver()
    config = write_config(tmp_path, None, [{"zone": unique("dead")}], nameserver=dead.nameserver)
    started = time.monotonic()
    result = check(config)
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stdout + result.stderr
    assert "TIMEOUT" in result.stdout
    assert elapsed < 15, elapsed  # bounded by blacklist.timeout, not by retries
    dead.close()


# --- failures to notify, concurrency --------------------------------------------------------------


def test_relay_down_keeps_the_listing_and_retries_at_the_next_check(
    tmp_path: Path, knot_dns: KnotDNS, mailbox: Mailbox, tickets: TicketServer
) -> None:
    zone = unique("relaydown")
    knot_dns.set_zone(zone, dnsbl_zone({GOOD: ("127.0.0.2", "x")}))
    closed_port = free_port("127.0.0.74")  # nobody listens: the relay is down
    tickets.fail_with = 503
    down = write_config(
        tmp_path,
        knot_dns,
        [{"zone": zone, "major": True}],
        relay=f"127.0.0.74:{closed_port}",
        ticket_url=tickets.url,
    )
    result = check(down)
    assert result.returncode == 2  # the listing counts whatever happens to the notices
    assert (
        "warning: listed_notice" in result.stderr and "retried at the next check" in result.stderr
    )
    assert "warning: ticket_open" in result.stderr and "HTTP 503" in result.stderr
    undelivered = status(down)["undelivered"]
    assert {(i["kind"], i["state"], i["attempts"]) for i in undelivered} == {
        ("ticket_open", "pending", 1),
        ("listed_notice", "pending", 1),
    }

    tickets.fail_with = None
    up = write_config(
        tmp_path,
        knot_dns,
        [{"zone": zone, "major": True}],
        relay=mailbox.relay,
        ticket_url=tickets.url,
    )
    result = check(up)
    assert result.returncode == 2 and result.stderr == ""
    assert len(tickets.posts) == 1
    [(_, notice)] = mailbox.all()
    assert "Ticket:        CHG-1" in notice.get_content()
    assert status(up)["undelivered"] == []
    assert check(up).returncode == 2 and len(mailbox.all()) == 1  # still no duplicate


def test_concurrent_checks_make_one_listing_and_one_notice(
    tmp_path: Path, knot_dns: KnotDNS, mailbox: Mailbox
) -> None:
    zone = unique("race")
    knot_dns.set_zone(zone, dnsbl_zone({GOOD: ("127.0.0.2", "x")}))
    config = write_config(tmp_path, knot_dns, [{"zone": zone}], relay=mailbox.relay)
    runs = [
        subprocess.Popen(
            [str(SMG), "blacklist", "check", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    codes = [run.wait(timeout=60) for run in runs]
    for run in runs:
        run.communicate(timeout=5)
    assert codes == [1, 1, 1]
    assert len(mailbox.all()) == 1
    snapshot = status(config)
    assert len(snapshot["open_listings"]) == 1 and len(snapshot["checks"]) == 3


def test_relay_deferring_the_notice_is_retried_not_lost(
    tmp_path: Path, knot_dns: KnotDNS, smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = smtp_sink("127.0.0.75", data_reply="451 4.3.0 try later")
    zone = unique("defer")
    knot_dns.set_zone(zone, dnsbl_zone({GOOD: ("127.0.0.2", "x")}))
    config = write_config(tmp_path, knot_dns, [{"zone": zone}], relay=sink.endpoint)
    first = check(config)
    assert first.returncode == 1
    assert "451" in first.stderr and "retried at the next check" in first.stderr
    [item] = status(config)["undelivered"]
    assert (item["kind"], item["state"], item["attempts"]) == ("listed_notice", "pending", 1)
    assert "451" in item["last_error"]
    sink.data_reply = "250 2.0.0 OK queued"
    second = check(config)
    assert second.returncode == 1 and second.stderr == ""
    delivered = [m for m in sink.messages if b"LISTED:" in m.data]
    assert len(delivered) == 2  # the deferred attempt reached DATA too, then the retry
    assert status(config)["undelivered"] == []
