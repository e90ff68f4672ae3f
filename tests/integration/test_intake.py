"""The SMTP intake of the real ``smg serve`` process: relay control, limits, smuggling, TLS,
timeouts, signals, metrics, and delivery on to a real Postfix far end.

Clients: swaks where it can say what is needed, a raw socket where the test must send bytes
swaks would correct (bare LF, non-ASCII without SMTPUTF8, over-long lines).
"""

from __future__ import annotations

import os
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binaries, require_root
from tests.harness import KnotDNS, TestCA, free_port, wait_for
from tests.harness.postfix import PostfixFarEnd
from tests.harness.swaks import swaks
from tests.integration.smg_relay import (
    SMG,
    SmgRelay,
    base_config,
    message_ids,
    server_said,
    to_toml,
)

pytestmark = pytest.mark.integration

ZONE = "intake.test"
ZONE_TEXT = """
sender      MX 10 mail.sender
mail.sender A 127.0.0.30
far         MX 10 mx.far
mx.far      A 127.0.0.31
"""
SENDER = f"alice@sender.{ZONE}"
RCPT = f"bob@far.{ZONE}"
MESSAGE = (
    f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: intake test\r\nMessage-ID: <{{mid}}@test>\r\n"
    "\r\nHello.\r\n"
)


@pytest.fixture(scope="module")
def zone(knot_dns: KnotDNS) -> KnotDNS:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    return knot_dns


@pytest.fixture(scope="module")
def far_end(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixFarEnd]:
    """Postfix on 127.0.0.31 (mx.far.intake.test), the far end every message goes to."""
    require_binaries("postfix")
    daemon = PostfixFarEnd(address="127.0.0.31", hostname=f"mx.far.{ZONE}", tls="none")
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture(scope="module")
def relay(
    zone: KnotDNS, far_end: PostfixFarEnd, test_ca: TestCA, tmp_path_factory
) -> Iterator[SmgRelay]:
    require_binaries("swaks")
    tmp = tmp_path_factory.mktemp("intake")
    leaf = test_ca.valid("gw.smg-test.example")
    config = base_config(
        tmp,
        zone.nameserver,
        max_message_size="20KB",
        max_recipients=3,
        max_connections=4,
        idle_timeout="3s",
        data_timeout="4s",
        tls_cert=str(leaf.cert_path),
        tls_key=str(leaf.key_path),
        metrics_listen=f"127.0.0.1:{free_port('127.0.0.1')}",
    )
    config["delivery"] = {"port": far_end.port, "retry_initial": "1h", "scan_interval": "200ms"}
    relay = SmgRelay(tmp, config)
    relay.start()
    yield relay
    relay.stop()


class Raw:
    """A raw SMTP client for the bytes swaks would not send."""

    def __init__(self, endpoint: str, source: str = "127.0.0.1") -> None:
        host, port = endpoint.rsplit(":", 1)
        self.sock = socket.create_connection(
            (host, int(port)), timeout=10, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")
        self.banner = self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return "\n".join(lines) or "<closed>"
            lines.append(line.decode(errors="replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def cmd(self, data: bytes | str) -> str:
        self.sock.sendall((data.encode() if isinstance(data, str) else data) + b"\r\n")
        return self.reply()

    def begin(self, rcpt: str = RCPT) -> None:
        assert self.cmd("EHLO raw.client").startswith("250")
        assert self.cmd(f"MAIL FROM:<{SENDER}>").startswith("250"), "MAIL"
        assert self.cmd(f"RCPT TO:<{rcpt}>").startswith("250"), "RCPT"
        assert self.cmd("DATA").startswith("354")

    def close(self) -> None:
        self.sock.close()


def message(mid: str) -> str:
    return MESSAGE.format(mid=mid)


def test_accepted_message_is_delivered_to_the_far_end(relay: SmgRelay, far_end) -> None:
    result = swaks(relay.endpoint, to=RCPT, mail_from=SENDER, data=message("deliver-1"))
    assert server_said(result.transcript, "250 2.0.0 Ok: queued as"), result.transcript
    received = far_end.wait_for_messages(1, timeout=20)
    mine = [m for m in received if b"<deliver-1@test>" in m.raw]
    assert mine and mine[0].rcpt_tos == (RCPT,) and mine[0].mail_from == SENDER
    assert mine[0].helo == "gw.smg-test.example"  # gateway.hostname as EHLO
    headers = mine[0].message.get_all("Received")
    assert "by gw.smg-test.example (smg)" in headers[1]  # ours, below the far end's
    wait_for(lambda: not relay.queued(), 10, what="the queue to empty")


def test_relay_control_refuses_strangers_and_queues_nothing(relay: SmgRelay) -> None:
    before = len(relay.queued())
    result = swaks(relay.endpoint, to=RCPT, mail_from=SENDER, local_address="127.0.0.2")
    assert server_said(result.transcript, "554 5.7.1 Relay access denied"), result.transcript
    assert not result.ok
    assert len(relay.queued()) == before
    assert "reason=relay_control" in relay.log()


def test_starttls_with_tls12_or_newer(relay: SmgRelay, test_ca: TestCA) -> None:
    result = swaks(relay.endpoint, to=RCPT, mail_from=SENDER, tls=True, data=message("tls-1"))
    assert result.ok, result.transcript
    assert "TLS started" in result.transcript or "TLSv1.3" in result.transcript
    host, port = relay.host_port
    tls12 = ssl.create_default_context(cafile=str(test_ca.ca_bundle))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12.check_hostname = False
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.starttls(context=tls12)
        assert client.sock.version() == "TLSv1.2"  # type: ignore[union-attr]
    tls11 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls11.check_hostname, tls11.verify_mode = False, ssl.CERT_NONE
    tls11.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        tls11.minimum_version = ssl.TLSVersion.TLSv1
        tls11.maximum_version = ssl.TLSVersion.TLSv1_1
    with smtplib.SMTP(host, port, timeout=10) as client, pytest.raises(ssl.SSLError):
        client.starttls(context=tls11)


def test_size_limit_declared_and_real(relay: SmgRelay) -> None:
    client = Raw(relay.endpoint)
    assert "SIZE 20000" in client.cmd("EHLO raw.client")
    assert client.cmd(f"MAIL FROM:<{SENDER}> SIZE=20001").startswith("552 5.3.4")
    client.close()
    before = len(relay.queued())
    big = message("big") + ("x" * 70 + "\r\n") * 400  # 28 KB while SIZE said nothing
    result = swaks(relay.endpoint, to=RCPT, mail_from=SENDER, data=big)
    assert server_said(result.transcript, "552 5.3.4"), result.transcript[-2000:]
    assert len(relay.queued()) == before


def test_recipient_limit(relay: SmgRelay) -> None:
    rcpts = [f"r{i}@far.{ZONE}" for i in range(5)]
    result = swaks(relay.endpoint, to=rcpts, mail_from=SENDER, extra_args=["--quit-after", "RCPT"])
    assert server_said(result.transcript, "452 4.5.3 Too many recipients"), result.transcript


@pytest.mark.parametrize(
    "trick",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\n.\r"],
    ids=["LF.LF", "LF.CRLF", "CR.CRLF", "CRLF.LF", "CRLF.CR", "LF.CR"],
)
def test_smuggling_cannot_end_data_or_slip_in_a_message(relay: SmgRelay, trick: bytes) -> None:
    before = len(relay.queued())
    client = Raw(relay.endpoint)
    client.begin()
    smuggle = (
        b"Subject: carrier\r\n\r\ncarrier" + trick + b"MAIL FROM:<" + SENDER.encode() + b">\r\n"
        b"RCPT TO:<victim@far." + ZONE.encode() + b">\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    client.sock.sendall(smuggle)
    reply = client.reply()
    assert reply.startswith("550 5.6.11"), reply
    assert client.cmd("NOOP").startswith("250")  # exactly one reply: nothing else was parsed
    client.close()
    assert len(relay.queued()) == before


def test_over_long_lines_and_malformed_commands(relay: SmgRelay) -> None:
    client = Raw(relay.endpoint)
    client.begin()
    assert client.cmd(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.").startswith("550 5.6.0")
    assert client.cmd("NOOP " + "z" * 2000).startswith("500 5.5.2")
    assert client.cmd("HELLO there").startswith("500 5.5.2")
    assert client.cmd("MAIL FROM:<a@b").startswith("501")
    assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.cmd("RCPT TO:<@hop.example:u@example.net>").startswith("550 5.7.1")
    assert client.cmd("RCPT TO:<u%v.example@example.net>").startswith("550 5.7.1")
    assert client.cmd("QUIT").startswith("221")


def test_non_ascii_needs_smtputf8(relay: SmgRelay, far_end: PostfixFarEnd) -> None:
    client = Raw(relay.endpoint)
    client.cmd("EHLO raw.client")
    assert client.cmd(f"MAIL FROM:<jörg@sender.{ZONE}>".encode()).startswith("553 5.6.7")
    assert client.cmd(f"MAIL FROM:<jörg@sender.{ZONE}> SMTPUTF8".encode()).startswith("250")
    assert client.cmd(f"RCPT TO:<dörte@far.{ZONE}>".encode()).startswith("250")
    assert client.cmd("DATA").startswith("354")
    body = "Subject: Grüße\r\nMessage-ID: <utf8-1@test>\r\n\r\nÄÖÜ\r\n.".encode()
    assert client.cmd(body).startswith("250 2.0.0")
    client.close()


def test_max_connections_then_421(relay: SmgRelay) -> None:
    clients = [Raw(relay.endpoint) for _ in range(4)]
    assert all(c.banner.startswith("220") for c in clients)
    extra = Raw(relay.endpoint)
    assert extra.banner.startswith("421 4.7.0"), extra.banner
    assert extra.reply() == "<closed>"
    for client in clients:
        client.cmd("QUIT")
        client.close()
    wait_for(lambda: Raw(relay.endpoint).banner.startswith("220"), 5, what="a free slot")


def test_idle_timeout(relay: SmgRelay) -> None:
    client = Raw(relay.endpoint)
    started = time.monotonic()
    assert client.reply().startswith("421 4.4.2")
    assert 2.5 < time.monotonic() - started < 6


def test_data_timeout_bounds_a_trickling_client(relay: SmgRelay) -> None:
    """A line every 0.5 s keeps no idle timer from firing; data_timeout (4 s) still ends it."""
    before = len(relay.queued())
    client = Raw(relay.endpoint)
    client.begin()
    started = time.monotonic()
    reply = ""
    for _ in range(40):  # a line every 0.5 s, at most 20 s
        readable, _, _ = select.select([client.sock], [], [], 0.5)
        if readable:
            reply = client.reply()
            break
        client.sock.sendall(b"trickle\r\n")
    assert reply.startswith("421 4.4.2"), reply
    assert 3.5 < time.monotonic() - started < 8
    assert len(relay.queued()) == before


def test_metrics_endpoint(relay: SmgRelay) -> None:
    host_port = relay.config["gateway"]["metrics_listen"]
    text = urllib.request.urlopen(f"http://{host_port}/metrics", timeout=5).read().decode()
    assert "smg_messages_received_total" in text
    assert 'smg_connections_refused_total{reason="relay_control"}' in text
    assert 'smg_queue_messages{state="active"}' in text
    assert 'smg_messages_rejected_total{reason="bare_line_ending",stage="data"}' in text


def test_bad_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nhostname = "gw.example.net"\nmax_message_size = "lots"\n')
    proc = subprocess.run([*SMG, "serve", "--config", str(bad)], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 78
    assert f"{bad}: gateway.max_message_size: expected a size" in proc.stderr
    check = subprocess.run([*SMG, "config", "validate", str(bad)], capture_output=True, text=True,
                           timeout=30)  # fmt: skip
    assert check.returncode == 1 and "gateway.max_message_size" in check.stderr


def test_sighup_reload_and_sigterm(zone: KnotDNS, tmp_path: Path) -> None:
    """Reload swaps client_networks for new sessions; a bad file keeps the old config;
    SIGTERM ends the process with 0."""
    relay = SmgRelay(tmp_path, base_config(tmp_path, zone.nameserver))
    relay.start()
    try:
        assert Raw(relay.endpoint, source="127.0.0.2").banner.startswith("554 5.7.1")
        relay.config["gateway"]["client_networks"] = ["127.0.0.1/32", "127.0.0.2/32"]
        relay.reload()
        wait_for(lambda: "reloaded" in relay.log(), 10, what="reload")
        assert Raw(relay.endpoint, source="127.0.0.2").banner.startswith("220")
        relay.config_path.write_text("[gateway]\nmax_recipients = 'many'\n")
        assert relay.proc is not None
        os.kill(relay.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload_failed" in relay.log(), 10, what="reload_failed")
        assert "gateway.max_recipients" in relay.log()
        assert Raw(relay.endpoint, source="127.0.0.2").banner.startswith("220")  # old config
    finally:
        assert relay.stop() == 0
    assert "stopped" in relay.log()


def test_validate_a_good_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(to_toml(base_config(tmp_path, "127.0.0.1:53")))
    proc = subprocess.run([*SMG, "config", "validate", str(good)], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK")


def test_sigterm_lets_a_transaction_in_flight_finish(zone: KnotDNS, tmp_path: Path) -> None:
    relay = SmgRelay(tmp_path, base_config(tmp_path, zone.nameserver))
    relay.start()
    try:
        sending = Raw(relay.endpoint)
        sending.begin()  # inside DATA
        idle = Raw(relay.endpoint)
        assert idle.cmd("EHLO idle.client").startswith("250")
        assert relay.proc is not None
        os.kill(relay.proc.pid, signal.SIGTERM)
        assert idle.reply().startswith("421 4.3.2")  # idle sessions are told at once
        sending.sock.sendall(message("in-flight").encode() + b".\r\n")
        assert sending.reply().startswith("250 2.0.0 Ok: queued as")
        assert sending.reply().startswith("421 4.3.2")  # and then it is closed
        assert relay.proc.wait(timeout=30) == 0
        relay.proc = None
    finally:
        relay.stop()
    assert message_ids(relay) == ["in-flight"]  # durable, waiting for the restart


def test_full_disk_is_a_4xx_never_a_lost_250(zone: KnotDNS, tmp_path: Path) -> None:
    """The spool on a small tmpfs: filled up, the client gets a 4xx and keeps its message;
    with space again, mail flows; only the messages that got a 250 are in the queue."""
    require_root()
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)], check=True)
    relay = SmgRelay(tmp_path, base_config(tmp_path, zone.nameserver, spool=str(spool)))
    try:
        relay.start()
        assert swaks(relay.endpoint, to=RCPT, mail_from=SENDER, data=message("before")).ok
        filler = spool / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(2048):  # bounded: the tmpfs has 1 MiB
                os.write(fd, b"\0" * 1024)
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        big = message("full") + ("z" * 76 + "\r\n") * 200
        full = swaks(relay.endpoint, to=RCPT, mail_from=SENDER, data=big)
        assert server_said(full.transcript, "452 4.3.1 Insufficient system storage"), (
            full.transcript[-1500:]
        )
        filler.unlink()
        assert swaks(relay.endpoint, to=RCPT, mail_from=SENDER, data=message("after")).ok
        assert message_ids(relay) == ["after", "before"]
    finally:
        relay.stop()
        subprocess.run(["umount", str(spool)], check=False)


def test_startup_failures_exit_1_with_the_reason(relay: SmgRelay, tmp_path: Path) -> None:
    taken = base_config(tmp_path, "127.0.0.1:53")
    taken["gateway"]["listen"] = [relay.endpoint]  # the module's relay holds it
    no_spool = base_config(tmp_path, "127.0.0.1:53", spool="/dev/null/spool")
    for config, reason in ((taken, "cannot listen"), (no_spool, "cannot open spool")):
        path = tmp_path / "smg.toml"
        path.write_text(to_toml(config))
        proc = subprocess.run([*SMG, "serve", "--config", str(path)], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"cannot start: {reason}" in proc.stdout + proc.stderr
