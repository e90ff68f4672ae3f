"""Bad input and dangerous configs against the real ``smg serve`` process and ``smg`` CLI
(issue 12, points 3 and 5): an EHLO that is not UTF-8, NUL in DATA, control characters in the
log and in ``smg queue show``, a config refused or warned about.

The recipient's MX has nothing listening: accepted mail stays in the spool (deferred), where
``smg queue`` reads it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import KnotDNS, wait_for
from tests.integration.smg_relay import SMG, SmgRelay, base_config, to_toml
from tests.integration.test_intake import Raw

pytestmark = pytest.mark.integration

ZONE = "input.test"
ZONE_TEXT = """
sender      MX 10 mail.sender
mail.sender A 127.0.0.40
far         MX 10 mx.far
mx.far      A 127.0.0.41
"""
SENDER = f"alice@sender.{ZONE}"
RCPT = f"bob@far.{ZONE}"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def relay(knot_dns: KnotDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmgRelay]:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    tmp = tmp_path_factory.mktemp("input")
    relay = SmgRelay(tmp, base_config(tmp, knot_dns.nameserver))
    relay.start()
    yield relay
    relay.stop()


def smg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMG, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=False)  # fmt: skip


def _transaction(client: Raw, body: bytes) -> str:
    assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.cmd(f"RCPT TO:<{RCPT}>").startswith("250")
    assert client.cmd("DATA").startswith("354")
    return client.cmd(body + b".")


def _message(subject: bytes) -> bytes:
    return (b"From: " + SENDER.encode() + b"\r\nTo: " + RCPT.encode() + b"\r\nSubject: " + subject
            + b"\r\n\r\nhello\r\n")  # fmt: skip


def test_invalid_utf8_ehlo_is_refused_and_mail_still_flows(relay: SmgRelay) -> None:
    client = Raw(relay.endpoint)
    try:
        assert client.cmd(b"EHLO bad\xff\xfe.example").startswith("501 5.5.2")
        assert client.cmd(b"EHLO a\x1b[2Jb.example").startswith("501 5.5.2")
        assert client.cmd("EHLO good.example").startswith("250")
        reply = _transaction(client, _message(b"after a bad EHLO"))
        assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    finally:
        client.close()
    queue_id = reply.split()[-1]
    wait_for(lambda: f"{queue_id}: received" in relay.log(), 10, what="the received line")
    log = relay.log()
    assert "\x1b" not in log and "\udcff" not in log
    assert "helo=a\\x1b[2Jb.example" in log  # the refused name, escaped in the reject line


def test_nul_in_data_is_554_and_not_queued(relay: SmgRelay) -> None:
    before = {m.id for m in relay.queued()}
    client = Raw(relay.endpoint)
    try:
        assert client.cmd("EHLO good.example").startswith("250")
        reply = _transaction(client, _message(b"nul") + b"a\x00b\r\n")
        assert reply.startswith("554 5.6.0"), reply
        assert client.cmd("NOOP").startswith("250")
    finally:
        client.close()
    wait_for(lambda: "reason=nul" in relay.log(), 10, what="the reject line")
    assert {m.id for m in relay.queued()} == before


def test_queue_show_escapes_what_the_client_wrote(relay: SmgRelay) -> None:
    client = Raw(relay.endpoint)
    try:
        assert client.cmd("EHLO good.example").startswith("250")
        reply = _transaction(client, _message(b"\x1b]0;pwned\x07\x1b[31mred\xe2\x80\xae"))
        assert reply.startswith("250 2.0.0"), reply
    finally:
        client.close()
    queue_id = reply.split()[-1]
    shown = smg("queue", "show", queue_id, "--config", str(relay.config_path))
    assert shown.returncode == 0, shown.stderr
    assert "Subject: \\x1b]0;pwned\\x07\\x1b[31mred\\u202e" in shown.stdout
    assert all(c.isprintable() or c in "\n\t" for c in shown.stdout)


def test_config_validate_refuses_and_warns(tmp_path: Path) -> None:
    head = '[gateway]\nhostname = "gw.example.net"\nrole = "bad"\n'
    bad = tmp_path / "bad.toml"
    bad.write_text(head + 'idle_timeout = 0\n[routing]\nverdict_header = "From"\n'
                   '[spam]\nspam_score = nan\n')  # fmt: skip
    result = smg("config", "validate", str(bad))
    assert result.returncode == 1
    for key in ("gateway.idle_timeout", "routing.verdict_header", "spam.spam_score"):
        assert f"{bad}: {key}: " in result.stderr, result.stderr
    # Checks across keys run once every value parsed.
    public = tmp_path / "public.toml"
    public.write_text(head + 'metrics_listen = "0.0.0.0:9925"\n')
    result = smg("config", "validate", str(public))
    assert result.returncode == 1 and f"{public}: gateway.metrics_listen: " in result.stderr
    shadowing = tmp_path / "shadowing.toml"
    shadowing.write_text('[gateway]\nhostname = "gw.example.net"\nrole = "bad"\n'
                         '[[tls_policy.rules]]\nsender = "*"\nrecipient = "*"\n')  # fmt: skip
    result = smg("config", "validate", str(shadowing))
    assert result.returncode == 0, result.stderr
    assert f"{shadowing}: tls_policy.rules[0]: warning: " in result.stderr
    assert result.stdout.strip() == f"{shadowing}: OK (1 warning)"


def test_relay_logs_config_warnings_at_start(knot_dns: KnotDNS, tmp_path: Path) -> None:
    relay = SmgRelay(tmp_path, base_config(tmp_path, knot_dns.nameserver))
    # to_toml writes sections of scalars: the rule (an array of tables) is appended.
    rule = '\n[[tls_policy.rules]]\nsender = "*"\nrecipient = "*"\n'
    relay.write_config = lambda: relay.config_path.write_text(to_toml(relay.config) + rule)
    relay.start()
    try:
        wait_for(lambda: "config_warning" in relay.log(), 10, what="the config warning")
    finally:
        relay.stop()
    line = next(x for x in relay.log().splitlines() if "config_warning" in x)
    assert "key=tls_policy.rules[0]" in line and "shadows MTA-STS" in line
